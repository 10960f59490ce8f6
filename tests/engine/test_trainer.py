"""The RL loop on the builtin tiny model: it learns, is deterministic, resumes exactly, splits across
processes without changing the update, and stops cleanly on bad rewards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runrl_engine import train
from runrl_engine.errors import TrainingAborted, UserError

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "configs" / "data" / "quickstart"


def cfg(**over):
    base = dict(model="builtin:tiny", prompt_file=str(QS / "prompts.jsonl"), reward_file=str(QS / "reward.py"),
                completion_length=8, max_steps=2, prompts_per_step=2, num_generations=4, micro_batch_size=8,
                learning_rate=3e-3, eval_every=0, save_every=0, seed=0)
    base.update(over)
    return base


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def rewards(result) -> list[float]:
    return [h["reward_mean"] for h in result.history]


def test_reward_rises_and_outputs_are_written(tmp_path, tiny_model_dir):
    result = train(cfg(max_steps=30, prompts_per_step=4, num_generations=8, micro_batch_size=32, learning_rate=5e-3,
                       eval_fraction=0.1, eval_every=10), output_dir=tmp_path)
    r = rewards(result)
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.2, r
    # run directory contract
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for key in ("reward_mean", "reward_std", "loss", "kl", "completion_length_mean", "step_time_s", "tokens_per_s",
                "reward_info/chars", "peak_rss_mb"):
        assert key in metrics[-1], key
    assert "eval_reward_mean" in metrics[9] and "eval_reward_mean" not in metrics[8]
    assert metrics[9]["time/eval_s"] > 0 and {"time/rollout_s", "time/update_s"} <= set(metrics[0])
    completions = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert {c["step"] for c in completions} == set(range(1, 31))
    first_step = [c for c in completions if c["step"] == 1]
    assert all(isinstance(c["completion"], str) and c["prompt"][0]["role"] == "system" for c in first_step)
    assert sum("verdict" in c["info"] for c in first_step) == 5  # strings sampled, 5 per step
    assert "hf_token" in (tmp_path / "config.yaml").read_text()
    assert "step 30" in (tmp_path / "logs.txt").read_text()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.hidden_size == 64


def test_parameters_change_and_same_seed_same_rewards(tmp_path, tiny_model_dir):
    a = train(cfg(), output_dir=tmp_path / "a")
    b = train(cfg(), output_dir=tmp_path / "b")
    c = train(cfg(seed=1), output_dir=tmp_path / "c")
    assert rewards(a) == rewards(b)
    assert rewards(a) != rewards(c)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sum(not torch.equal(wa[k], base[k]) for k in base) == len(base)  # every tensor moved


@pytest.mark.parametrize("extra", [{}, {"algorithm": "ppo", "critic": "separate", "ppo_epochs": 2}],
                         ids=["grpo", "ppo-separate-critic"])
def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, extra):
    """Checkpoints hold everything the next steps depend on (under PPO: the critic and its optimizer state)."""
    straight = train(cfg(max_steps=4, **extra), output_dir=tmp_path / "straight")
    out = tmp_path / "resumed"
    train(cfg(max_steps=4, save_every=2, **extra), output_dir=out)  # the reference for the resumed run's checkpoint
    # a crash after step 4's records, before its checkpoint and final/: resume from step 2, whose later records
    # are dropped (trim_streams) and logged again by the resumed run
    import shutil

    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-4")
    resumed = train(cfg(max_steps=4, save_every=2, **extra), output_dir=out, resume=True)
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert rewards(resumed) == rewards(straight)[2:]
    for key in ("value_loss", "explained_variance"):
        if key in straight.history[-1]:
            assert resumed.history[-1][key] == pytest.approx(straight.history[-1][key], rel=1e-4, abs=1e-6), key
    ws, wr = weights(tmp_path / "straight"), weights(out)
    for k in ws:
        torch.testing.assert_close(wr[k], ws[k], atol=1e-6, rtol=1e-5)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_lora_trains_the_adapter_and_kl_uses_the_base(tmp_path, tiny_model_dir):
    result = train(cfg(max_steps=3, use_lora=True, lora_rank=4, lora_alpha=8, beta=0.1), output_dir=tmp_path)
    kls = [h["kl"] for h in result.history]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[-1] > 0  # the adapter starts at the base model
    merged, base = weights(tmp_path), load_file(str(tiny_model_dir / "model.safetensors"))
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # only LoRA-adapted linear layers moved
    unmerged = train(cfg(max_steps=1, use_lora=True, lora_rank=4, merge_lora=False), output_dir=tmp_path / "u")
    assert (unmerged.final_dir / "adapter_config.json").is_file()


def test_warmup_and_decay_follow_the_schedule(tmp_path, tiny_model_dir):
    """The logged learning rate is the one each step used: linear warm-up over half the steps (also with the
    default constant schedule), then constant; or a linear decay to 0."""
    warm = train(cfg(max_steps=4, warmup_ratio=0.5), output_dir=tmp_path / "warm")
    assert [h["learning_rate"] for h in warm.history] == pytest.approx([0.0, 1.5e-3, 3e-3, 3e-3])
    decay = train(cfg(max_steps=2, lr_scheduler="linear", algorithm="ppo", ppo_epochs=2), output_dir=tmp_path / "d")
    # 4 optimizer steps at 3e-3 x (1, 3/4, 1/2, 1/4); each record averages its step's two
    assert [h["learning_rate"] for h in decay.history] == pytest.approx([3e-3 * 7 / 8, 3e-3 * 3 / 8])
    assert decay.history[0]["critic_learning_rate"] == pytest.approx(3e-3 * 7 / 8)


def test_reference_model_only_when_beta_positive(tmp_path, tiny_model_dir):
    from runrl_engine.config import RunConfig
    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    no_kl = Trainer(build_run(RunConfig.from_dict(cfg()), tmp_path / "a"))
    with_kl = Trainer(build_run(RunConfig.from_dict(cfg(beta=0.04)), tmp_path / "b"))
    try:
        assert no_kl.updater.ref_model is None and with_kl.updater.ref_model is not None
        assert not any(p.requires_grad for p in with_kl.updater.ref_model.parameters())
    finally:
        for t in (no_kl, with_kl):
            t.close()


def test_failing_rewards_stop_the_run(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.py"
    bad.write_text("def reward_fn(completion, **row):\n    raise ValueError('boom ' + str(row.get('letter')))\n")
    with pytest.raises(TrainingAborted) as err:
        train(cfg(reward_file=str(bad), max_steps=10, max_failed_reward_steps=3), output_dir=tmp_path / "run")
    assert "3 consecutive steps" in err.value.render() and "boom a" in err.value.render()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["reward_errors"] == 8 for m in metrics)
    assert "ValueError: boom a" in (tmp_path / "run" / "logs.txt").read_text()


def test_some_failing_rewards_are_counted_not_fatal(tmp_path, tiny_model_dir):
    flaky = tmp_path / "flaky.py"
    flaky.write_text("def reward_fn(completion, **row):\n    if 'a' in completion:\n        raise RuntimeError('x')\n"
                     "    return 1.0\n")
    result = train(cfg(reward_file=str(flaky), max_steps=2), output_dir=tmp_path / "run")
    assert result.steps == 2 and sum(h["reward_errors"] for h in result.history) > 0


def test_hf_push_without_token_keeps_the_model(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = train(cfg(max_steps=1, hf_name="someone/model"), output_dir=tmp_path)
    assert (result.final_dir / "model.safetensors").is_file()
    assert "no hf_token" in (tmp_path / "logs.txt").read_text()
    record = json.loads((tmp_path / "hf_push.json").read_text())  # what `runrl serve` shows on the run
    assert (record["repo_id"], record["status"], record["url"]) == ("someone/model", "skipped", None)
    assert "no hf_token" in record["error"] and record["at"].endswith("Z")


def test_bad_package_requirements_stop_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(UserError) as err:
        train(cfg(package_requirements=["bad spec ==="]), output_dir=tmp_path)
    assert "bad spec" in err.value.render()
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()


def test_wandb_offline(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(cfg(max_steps=1, report_to=["wandb"]), output_dir=tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "an offline W&B run directory"


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"algorithm": "ppo", "ppo_epochs": 2}, {"scale_rewards": "batch"}],
                         ids=["grpo", "ppo", "grpo-batch-std"])
def test_two_processes_equal_one(tmp_path, tiny_model_dir, extra):
    """2 processes x 1 prompt each == 1 process x 2 prompts (accelerate, gloo on CPU). Under PPO this also checks
    that advantages are whitened with the statistics of both processes' tokens; with `scale_rewards: batch`, that
    the std divides by is both processes' rewards' (each process holds one group: its own std would differ)."""
    config = two_process_config(tmp_path, extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "runrl_engine.cli", "train", str(config), "--output", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equals_one_process(tmp_path, tmp_path / "two", tiny_model_dir, extra)


def two_process_config(tmp_path: Path, extra: dict) -> Path:
    """The config both processes train in `test_two_processes_equal_one` (and the two-node test)."""
    import yaml

    config = tmp_path / "c.yaml"
    # a decaying schedule: each process must step it once per optimizer step, not once per process
    config.write_text(yaml.safe_dump(cfg(max_steps=1, lr_scheduler="linear", **extra)))
    return config


def assert_equals_one_process(tmp_path: Path, two: Path, tiny_model_dir: Path, extra: dict) -> None:
    """`two` was trained on 2 processes from `two_process_config(tmp_path, extra)`: its metrics and weights equal a
    1-process run of the same config (trained here), and the weights moved."""
    assert "on 2 process(es)" in (two / "logs.txt").read_text()
    one = train(cfg(max_steps=1, lr_scheduler="linear", **extra), output_dir=tmp_path / "one")
    two_metrics = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
    assert two_metrics["reward_mean"] == pytest.approx(one.history[0]["reward_mean"])
    for key in ("loss", "value_loss", "explained_variance", "advantage/advantage_std_raw", "learning_rate"):
        if key in one.history[0] or key == "loss":
            assert two_metrics[key] == pytest.approx(one.history[0][key], abs=1e-5), key
    w1, w2, base = weights(tmp_path / "one"), weights(two), load_file(str(tiny_model_dir / "model.safetensors"))
    for k in w1:
        step = (w1[k] - base[k]).abs().max()
        assert step > 1e-4
        torch.testing.assert_close(w2[k], w1[k], atol=step.item() * 0.05, rtol=0)


@pytest.mark.slow
def test_two_nodes_equal_one(tmp_path, tiny_model_dir):
    """Multi-node through `runrl launch` (issue 19): two node launchers on this machine (`--num_machines 2
    --machine_rank 0|1`, one process each, rendezvous on loopback, gloo) train as one 2-process job, and the result
    equals the 1-process run. Both write to one --output, as nodes do on a shared file system. The collectives are
    those of `test_two_processes_equal_one`; what this adds is the cross-node launch: global ranks from
    machine_rank, one main process of two local rank 0s."""
    from tests.conftest import free_port

    config, port = two_process_config(tmp_path, {}), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "runrl_engine.cli", "launch", "--multi_gpu", "--num_machines", "2",
                               "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                               "train", str(config), "--output", str(tmp_path / "two")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"
    assert_equals_one_process(tmp_path, tmp_path / "two", tiny_model_dir, {})


def test_held_out_file_greedy_eval_at_start(tmp_path, tiny_model_dir):
    """`eval_prompt_file` replaces the random split; `eval_at_start` logs a step-0 record; greedy eval is
    reproducible (the same weights give the same score, whatever the seed salt of the step)."""
    held_out = tmp_path / "held_out.jsonl"
    lines = (QS / "prompts.jsonl").read_text().splitlines()
    held_out.write_text("\n".join(lines[:3]) + "\n")
    run = tmp_path / "run"
    result = train(cfg(max_steps=2, eval_prompt_file=str(held_out), eval_at_start=True, eval_every=1,
                       eval_temperature=0, eval_num_generations=1, learning_rate=1e-12, eval_fraction=0.5),
                   output_dir=run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["phase"] == "eval" and "reward_mean" not in records[0]
    scores = [r["eval_reward_mean"] for r in records]
    assert scores[0] == scores[1] == scores[2]  # greedy, and a learning rate too small to change a weight
    assert result.history[0]["step"] == 0
    log = (run / "logs.txt").read_text()
    assert f"{len(lines)} training prompts, 3 held out" in log  # eval_fraction is not used with a file
    assert "step 0: eval reward" in log


def test_greedy_sampling_takes_the_argmax():
    from runrl_engine.rollout.hf import sample_with_logprobs
    from runrl_engine.rollout.types import SamplingParams

    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 4.0]])
    picked, _ = sample_with_logprobs(logits, torch.tensor([0.999, 0.999]),
                                     SamplingParams(max_new_tokens=1, temperature=0, top_p=0.5))
    assert picked.tolist() == [1, 0]
    sampled, _ = sample_with_logprobs(logits, torch.tensor([0.999, 0.999]), SamplingParams(max_new_tokens=1))
    assert sampled.tolist() != [1, 0]
