"""Same config, same seed, same machine: the same metrics and the same completions, bit for bit, on CPU.

The cause found (issue 13): the update's shared-prompt forward gave each row its prompt's KV cache and head outputs
by tensor indexing (`t[group]`, transformers' `DynamicLayer.batch_select_indices`). Indexing's backward is
`index_put_(accumulate=True)`, which on CPU, with more than one thread and at least 32768 elements, adds floats
with atomics in whatever order the threads arrive (`torch.use_deterministic_algorithms` lists it): the gradients
of a prompt's keys and values, summed over its completions, changed in the last bits from run to run whenever
those completions fell in both threads' shares, and PPO's quickstart drifted to other rewards.

`test_the_update_backward_adds_in_a_fixed_order` checks that mechanism directly, so it fails on the old code
whatever the threads' timing: no `index_put_(accumulate=True)` with repeated indices in the update's backward
(padded and padding-free layouts), and bitwise-equal gradients over repeats with two threads and shuffled rows.
The end-to-end cases then run twice in this process (the races happen within a process as well) and compare
metrics.jsonl without timing/memory keys, and completions.jsonl: GRPO, PPO with the value head and with a
separate critic (2 epochs x 2 shuffled minibatches), an environment, LoRA with a KL to the base, and
`deterministic: true`, all with two torch threads and micro-batches of 32 rows (16 per PPO minibatch) over
prompts of 59-70 tokens, i.e. about 32768 cache elements or more per layer. `slow`: two `runrl train` processes with different
PYTHONHASHSEEDs, and an MCP tool run after an SFT warm-start. Not covered: GPUs (README "Reproducibility").
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from runrl_engine import train
from runrl_engine.batch import RolloutBatch, pad_left, pad_right
from tests.conftest import TOOL_WARM_START, tool_config

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "configs" / "data" / "quickstart"
GUESS = ROOT / "configs" / "data" / "guess_number"
TIMING = ("step_time_s", "tokens_per_s", "peak_rss_mb", "peak_vram_mb")


def cfg(**over):
    base = dict(model="builtin:tiny", prompt_file=str(QS / "prompts.jsonl"), reward_file=str(QS / "reward.py"),
                completion_length=8, max_steps=2, prompts_per_step=4, num_generations=8, micro_batch_size=32,
                learning_rate=3e-3, eval_every=0, save_every=0, seed=0, log_completions=32, num_threads=2)
    base.update(over)
    return base


PPO = dict(algorithm="ppo", ppo_epochs=2, num_minibatches=2, vf_coef=0.1, entropy_coef=0.01, gamma=1.0, lam=0.95)
ENV = dict(type="environment", prompt_file=str(GUESS / "prompts.jsonl"), reward_file=str(GUESS / "env.py"),
           max_turns=3, completion_length=8)


def comparable(run: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl without timing/memory keys, and completions.jsonl."""
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.startswith("time/")}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    return metrics, completions


def assert_same_runs(a: Path, b: Path) -> None:
    (ma, ca), (mb, cb) = comparable(a), comparable(b)
    assert len(ma) == len(mb) and ma, (len(ma), len(mb))
    for ra, rb in zip(ma, mb):
        diff = {k: (ra.get(k), rb.get(k)) for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)}
        assert not diff, f"step {ra.get('step')}: {diff}"
    assert ca == cb


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # num_threads sets torch's process-wide count


class RepeatedIndexAccumulation(TorchDispatchMode):
    """Records float `index_put_(accumulate=True)` calls whose indices repeat: CPU adds those with atomics, in
    thread-arrival order, when more than one thread runs (what made the update's gradients differ)."""

    OPS = {torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
           torch.ops.aten._index_put_impl_.default}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS and (kwargs.get("accumulate") or (len(args) > 3 and args[3])) and args[0].is_floating_point():
            indices = [i for i in args[1] if i is not None]
            keys = torch.stack([i.reshape(-1) for i in torch.broadcast_tensors(*indices)], dim=1)
            if len(torch.unique(keys, dim=0)) < len(keys):
                self.calls.append(tuple(args[2].shape))
        return func(*args, **kwargs)


def shared_prompt_batch(tokens: int, seed: int = 0) -> RolloutBatch:
    """4 prompts of ~70 tokens x 8 completions of 4-16 tokens, rows shuffled (as PPO's minibatches and the
    length-sorted micro-batch layout leave them): the prompts' rows interleave across the two threads' halves."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, tokens, (60 + 5 * i,), generator=gen).tolist() for i in range(4)]
    completions = [torch.randint(0, tokens, (4 + (3 * k) % 13,), generator=gen).tolist() for k in range(32)]
    order = torch.randperm(32, generator=gen).tolist()
    prompt_ids, prompt_mask = pad_left([prompts[k // 8] for k in order], 0)
    rows = [completions[k] for k in order]
    mask = pad_right([[1.0] * len(c) for c in rows], 0.0, torch.float32)
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=pad_right(rows, 0),
                        completion_mask=pad_right([[1] * len(c) for c in rows], 0), loss_mask=mask,
                        advantages=torch.zeros(32), rewards=torch.zeros(32))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_update_backward_adds_in_a_fixed_order(tiny_model_dir, monkeypatch, packed):
    from transformers import AutoModelForCausalLM

    import runrl_engine.forward as forward

    monkeypatch.setattr(forward, "_packing_pays", lambda *a: packed)  # the tiny model would not pack on its own
    torch.set_num_threads(2)  # the atomic path needs two threads (restored by _restore_threads)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    mb = shared_prompt_batch(model.config.vocab_size)
    C = mb.completion_ids.shape[1]
    weights = torch.randn(len(mb), C, model.config.vocab_size, generator=torch.Generator().manual_seed(1))

    def call(cache=None, **inputs):
        return (model(**inputs, cache=cache, use_cache=cache is not None).logits,)

    def gradients(mode=None):
        model.zero_grad(set_to_none=True)
        (logits,) = forward.completion_outputs(call, mb, config=model.config, share_prompts=True, packed=packed)
        loss = (logits * weights).sum()
        with mode if mode is not None else contextlib.nullcontext():
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    mode = RepeatedIndexAccumulation()
    first = gradients(mode)
    assert mode.calls == [], f"index_put_(accumulate=True) with repeated indices in the backward: {mode.calls}"
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(first, gradients()))


CASES = {"grpo": {}, "ppo_head": dict(PPO, critic="head"), "ppo_separate": dict(PPO, critic="separate"),
         "environment": ENV, "lora": dict(use_lora=True, lora_rank=4, lora_alpha=8, learning_rate=1e-2, beta=0.05)}


@pytest.mark.parametrize("case", CASES)
def test_same_seed_same_metrics_and_completions(tmp_path, tiny_model_dir, case):
    for name in ("a", "b"):
        train(cfg(**CASES[case]), output_dir=tmp_path / name)
    assert_same_runs(tmp_path / "a", tmp_path / "b")


def test_deterministic_changes_no_number_on_cpu_and_gives_torch_its_modes_back(tmp_path, tiny_model_dir):
    """`deterministic: true` (meant for CUDA) runs on CPU, gives the same numbers there (the CPU path needs none
    of it), and leaves torch's process-wide flags as it found them; its environment variables stay set."""
    saved = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")}
    try:
        for k in saved:
            os.environ.pop(k, None)
        assert not torch.are_deterministic_algorithms_enabled()
        train(cfg(deterministic=True), output_dir=tmp_path / "a")
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    train(cfg(), output_dir=tmp_path / "b")
    assert_same_runs(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_another_process_with_another_hash_seed_agrees(tmp_path, tiny_model_dir):
    """`runrl train` twice, as separate processes with different PYTHONHASHSEEDs (set and dict orders of strings)."""
    config = tmp_path / "ppo.json"
    config.write_text(json.dumps(cfg(**PPO, critic="head", max_steps=3)))
    for name, hash_seed in (("a", "1"), ("b", "2")):
        subprocess.run([sys.executable, "-m", "runrl_engine.cli", "train", str(config), "--output",
                        str(tmp_path / name)], check=True, cwd=ROOT, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
    assert_same_runs(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_tool_run_same_seed_same_metrics(tmp_path, tool_warm_start, calculator_url):
    """SFT warm start (so the tiny model calls `add`), then RL steps whose turns are answered by a real MCP server.
    The first run is the session's `tool_warm_start` (trained earlier in this process); the second is trained here."""
    _, first = tool_warm_start
    train(tool_config(calculator_url, **TOOL_WARM_START), output_dir=tmp_path / "b")
    metrics, _ = comparable(first)
    assert any(m.get("tool_calls_per_episode", 0) > 0 for m in metrics)  # the tools were really called
    assert_same_runs(first, tmp_path / "b")
