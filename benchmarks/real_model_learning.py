"""Learning check on a real model: our trainer and TRL 1.16's GRPOTrainer on configs/smollm2_arithmetic.yaml.

    python benchmarks/real_model_learning.py                    # seed 0, the config's max_steps
    python benchmarks/real_model_learning.py --seeds 0,1,2 --steps 40
    python benchmarks/real_model_learning.py --quick            # 2 steps, 8 eval questions: a smoke test
    python benchmarks/real_model_learning.py --parallel         # both sides at once, 1 thread each

Both sides train SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, the same cached HF directory) on the same
training questions with the same reward function, seed and hyperparameters, all read from the config: prompts per
step x completions per prompt, completion length, temperature, learning rate (constant), beta, loss `dapo`, clip
0.2, grad-norm clip 1, fp32, sdpa, no gradient checkpointing, micro-batches of `micro_batch_size` (TRL: per-device
batch = micro-batch, gradient accumulation = steps_per_generation = sequences per step / micro-batch). Ours calls
the reward in its sandbox; TRL in-process through its `(prompts, completions, **columns)` convention.

Held-out accuracy (the config's `eval_prompt_file`, greedy, one answer per question, the reward as the score) is
measured by one evaluator for both sides — `heldout_accuracy`, transformers' `generate` with `do_sample=False` — at
step 0 and every `eval_every` steps: for TRL from a `TrainerCallback`, for ours on the same steps through a hook on
the trainer's own eval (its greedy decode loop is logged next to it as `ours_own_eval`, a cross-check).

Each (side, seed) runs in its own subprocess, alternating sides (or both at once with `--parallel`); the output is both curves and the final held-out
accuracies side by side, and their per-seed difference. This is a learning check, not a speed benchmark: step times
are printed but the sides are not timed against each other here (see grpo_vs_trl.py).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
from grpo_vs_trl import load_reward_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_arithmetic.yaml"
SIDES = ("ours", "trl")


def load_settings(steps: int | None, seed: int, quick: bool, threads: int | None = None) -> Any:
    from runrl_engine.config import load_config

    over = [f"seed={seed}"] + ([f"max_steps={steps}"] if steps else []) + ([f"num_threads={threads}"] if threads else [])
    if quick:
        over += ["max_steps=2", "eval_every=1", "eval_max_prompts=8", "prompts_per_step=2", "num_generations=4",
                 "micro_batch_size=8", "completion_length=16"]
    return load_config(CONFIG, over)


def read_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def heldout_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]], reward_fn, max_new_tokens: int,
                     batch: int = 25) -> float:
    """Mean reward of one greedy answer per held-out row (transformers' generate, left padding)."""
    import torch

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    total = 0.0
    try:
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                     for r in part]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for row, text in zip(part, answers):
                fields = {k: v for k, v in row.items() if k != "prompt"}
                score = reward_fn(text, **fields)
                total += float(score[0] if isinstance(score, tuple) else score)
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return total / max(len(rows), 1)


# ---- one side (inside a worker subprocess) ---------------------------------------------------------------------

def run_ours(cfg: Any, work: Path) -> dict[str, Any]:
    import torch

    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    trainer = Trainer(build_run(cfg, work / "ours-run"))
    rows = read_rows(cfg.eval_prompt_file, cfg.eval_max_prompts)
    reward_fn = load_reward_fn(Path(cfg.reward_file))
    curve: dict[int, float] = {}
    own_eval = trainer._evaluate

    def evaluate(step: int) -> float:  # the trainer's eval steps, scored by the shared evaluator as well
        model = trainer.parts.policy()
        curve[step] = heldout_accuracy(model, trainer.tokenizer, rows, reward_fn, cfg.completion_length)
        return own_eval(step)

    trainer._evaluate = evaluate
    t0 = time.perf_counter()
    result = trainer.run()
    own = {r["step"]: r["eval_reward_mean"] for r in result.history if "eval_reward_mean" in r}
    steps = [r for r in result.history if "reward_mean" in r]
    return {"side": "ours", "eval": curve, "ours_own_eval": own, "reward": [r["reward_mean"] for r in steps],
            "step_s": [r["step_time_s"] for r in steps], "wall_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads()}


def run_trl(cfg: Any, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from runrl_engine.tiny import resolve_model_path

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    path = resolve_model_path(cfg.model)
    reward_fn = load_reward_fn(Path(cfg.reward_file))
    train_rows = read_rows(cfg.prompt_file)
    rows = read_rows(cfg.eval_prompt_file, cfg.eval_max_prompts)

    def reward(prompts, completions, expected, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(reward_fn(t, expected=e)[0]) for t, e in zip(texts, expected)]

    reward.__name__ = "reward_fn"
    n_seq = cfg.prompts_per_step * cfg.num_generations
    micro = min(cfg.micro_batch_size, n_seq)
    if n_seq % micro:
        raise ValueError(f"TRL needs the micro-batch ({micro}) to divide the step's {n_seq} sequences")
    args = GRPOConfig(
        output_dir=str(work / "trl-run"), max_steps=cfg.max_steps, learning_rate=cfg.effective_learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        beta=cfg.beta, loss_type=cfg.loss_type, epsilon=cfg.epsilon, scale_rewards="group",
        num_generations=cfg.num_generations, per_device_train_batch_size=micro,
        gradient_accumulation_steps=n_seq // micro, steps_per_generation=n_seq // micro, num_iterations=1,
        max_completion_length=cfg.completion_length, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True, use_vllm=False, report_to=[],
        logging_steps=1, save_strategy="no", seed=cfg.seed, disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False, model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    trainer = GRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(train_rows),
                          processing_class=tokenizer)
    curve: dict[int, float] = {}
    records: list[dict[str, Any]] = []
    ends: list[float] = []

    class Eval(TrainerCallback):
        def _score(self, step: int, model: Any) -> None:
            curve[step] = heldout_accuracy(model, tokenizer, rows, reward_fn, cfg.completion_length)

        def on_train_begin(self, _args, _state, _control, model=None, **kw):
            if cfg.num_threads:
                torch.set_num_threads(cfg.num_threads)
            if cfg.eval_at_start:
                self._score(0, model)
            ends.append(time.perf_counter())

        def on_step_end(self, _args, state, _control, model=None, **kw):
            ends.append(time.perf_counter())
            step = state.global_step
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                self._score(step, model)

        def on_log(self, _args, _state, _control, logs=None, **kw):
            if logs and "reward" in logs:
                records.append(dict(logs))

    trainer.add_callback(Eval())
    t0 = time.perf_counter()
    trainer.train()
    return {"side": "trl", "eval": curve, "reward": [lg["reward"] for lg in records],
            "step_s": [b - a for a, b in zip(ends, ends[1:])], "wall_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads()}


def worker(side: str, steps: int | None, seed: int, quick: bool, threads: int | None) -> None:
    cfg = load_settings(steps, seed, quick, threads)
    with tempfile.TemporaryDirectory(prefix=f"learn-{side}-") as tmp:
        out = (run_ours if side == "ours" else run_trl)(cfg, Path(tmp))
    out["eval"] = {str(k): v for k, v in out["eval"].items()}
    print("RESULT " + json.dumps(out))


def start(side: str, steps: int | None, seed: int, quick: bool, threads: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", side, "--seed", str(seed)] + (["--steps", str(steps)] if steps else [])
    cmd += (["--threads", str(threads)] if threads else []) + (["--quick"] if quick else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(proc: subprocess.Popen, side: str, seed: int, timeout_s: float) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{side} seed {seed} ran past {timeout_s:.0f} s") from None
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} seed {seed} failed (rc {proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["eval"] = {int(k): v for k, v in result["eval"].items()}
    if "ours_own_eval" in result:
        result["ours_own_eval"] = {int(k): v for k, v in result["ours_own_eval"].items()}
    return result


def summarize(results: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    finals = {side: [res[side]["eval"][max(res[side]["eval"])] for res in results.values()] for side in SIDES}
    starts = {side: [res[side]["eval"].get(0) for res in results.values()] for side in SIDES}
    diffs = [o - t for o, t in zip(finals["ours"], finals["trl"])]

    def spread(xs: list[float]) -> dict[str, float | None]:
        return {"mean": statistics.fmean(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else None}

    return {"seeds": sorted(results), "final": {s: spread(v) for s, v in finals.items()},
            "start": {s: starts[s] for s in SIDES}, "final_per_seed": finals, "ours_minus_trl": spread(diffs)}


def print_results(results: dict[int, dict[str, dict[str, Any]]], summary: dict[str, Any]) -> None:
    for seed, res in sorted(results.items()):
        steps = sorted(set(res["ours"]["eval"]) | set(res["trl"]["eval"]))
        print(f"\nseed {seed}: held-out accuracy (greedy, shared evaluator) per step")
        print("  step   ours   trl    ours(own eval)")
        for s in steps:
            own = res["ours"].get("ours_own_eval", {}).get(s)
            cells = [res[side]["eval"].get(s) for side in SIDES]
            print(f"  {s:4d}  " + "  ".join("  -  " if c is None else f"{c:.3f}" for c in cells)
                  + ("" if own is None else f"  {own:.3f}"))
        for side in SIDES:
            r, st = res[side]["reward"], res[side]["step_s"]
            print(f"  {side}: training reward first/last 5 steps {statistics.fmean(r[:5]):.3f} -> "
                  f"{statistics.fmean(r[-5:]):.3f}; median step {statistics.median(st):.1f} s; "
                  f"wall {res[side]['wall_s']:.0f} s")
    f = summary["final"]
    print(f"\nfinal held-out accuracy over seeds {summary['seeds']}: ours {f['ours']['mean']:.3f}, "
          f"TRL {f['trl']['mean']:.3f}; ours - TRL {summary['ours_minus_trl']['mean']:+.3f}"
          + (f" (stdev {summary['ours_minus_trl']['stdev']:.3f})" if summary["ours_minus_trl"]["stdev"] else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (one run per side and seed)")
    p.add_argument("--steps", type=int, default=None, help="override the config's max_steps")
    p.add_argument("--quick", action="store_true", help="2 steps on 8 eval questions: checks the script works")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per side and seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads per side (default: the config's)")
    p.add_argument("--parallel", action="store_true", help="run the two sides at the same time (1 thread each "
                                                           "unless --threads): a learning check, not a timing")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.steps, a.seed, a.quick, a.threads)
        return 0
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for i, seed in enumerate(int(s) for s in re.split(r"[, ]+", a.seeds.strip()) if s):
        order = SIDES if i % 2 == 0 else SIDES[::-1]  # alternate who goes first, for the background load
        if a.parallel:  # both sides at once, one thread each: half the wall time, same curves
            procs = {side: start(side, a.steps, seed, a.quick, a.threads or 1) for side in order}
            results[seed] = {side: finish(procs[side], side, seed, a.timeout) for side in order}
        else:
            results[seed] = {side: finish(start(side, a.steps, seed, a.quick, a.threads), side, seed, a.timeout)
                             for side in order}
    summary = summarize(results)
    print_results(results, summary)
    if a.json:
        a.json.write_text(json.dumps({"results": results, "summary": summary}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
