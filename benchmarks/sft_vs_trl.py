"""SFT warm-start throughput: our `run_sft` against TRL 1.16's `SFTTrainer` with its defaults, side by side.

    python benchmarks/sft_vs_trl.py                         # SmolLM2-135M-Instruct, 96 conversations, 2 rounds
    python benchmarks/sft_vs_trl.py --sides ours,trl-fp32 --rounds 1
    python benchmarks/sft_vs_trl.py --quick                 # builtin tiny model, 16 conversations (smoke test)

Sides, each (side, round) in its own subprocess, alternated (ours, TRL, ours, TRL, ...) so both see the same load:
- `ours`: `runrl_engine.sft.run_sft`, what a run with `sft_file` does before RL (fp32 on CPU, no gradient
  checkpointing, batches of `--batch` conversations, the loss on assistant tokens only, and, where it is exact,
  padding-free batches: see `runrl_engine/sft.py`).
- `trl`: `SFTTrainer(model=path, args=SFTConfig(...))` with TRL's defaults, given only what any run must say:
  the output dir, `use_cpu` (this machine has no GPU), `report_to=[]`, the epochs, learning rate, batch size
  and seed of ours. On this CPU those defaults mean bf16 autocast and gradient checkpointing (TRL's choices for
  GPUs), every token in the loss, batches padded to their longest row.
- `trl-fp32`: the same with fp32 and no gradient checkpointing, which shows how much of the gap is settings.

Examples per second = conversations trained / the wall time of the training call (`run_sft` or
`trainer.train()`; building the trainer and tokenising the data are reported apart as `setup s`); tokens per
second counts each conversation's real tokens (its chat-template rendering, no padding). Peak memory is the
worker's `ru_maxrss`. The conversations are arithmetic questions with answers of 1 to 12 sentences, generated
deterministically, so their lengths spread as real SFT data does (16-210 tokens with SmolLM2's template).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("ours", "trl", "trl-fp32")
STEPS = ("First add the tens: {a1} + {b1} = {t}.", "Then add the ones: {a0} + {b0} = {o}.",
         "Carry what is over ten into the tens.", "Check it by counting up from {a} in steps of ten.",
         "The order of the numbers does not change a sum.", "Writing the numbers in a column helps.",
         "Read the question twice before answering.", "Both numbers are less than one hundred.",
         "A sum of two two-digit numbers has at most three digits.", "Subtracting {b} from the result gives {a}.",
         "So the total is {s}.", "That is the whole calculation.")


def make_conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        fields = dict(a=a, b=b, a1=a // 10 * 10, b1=b // 10 * 10, t=a // 10 * 10 + b // 10 * 10, a0=a % 10, b0=b % 10,
                      o=a % 10 + b % 10, s=a + b)
        k = rng.randint(1, len(STEPS))
        answer = " ".join(s.format(**fields) for s in rng.sample(STEPS, k)) + f" The answer is {a + b}."
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ours(model: str, data: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from runrl_engine.config import RunConfig
    from runrl_engine.models import load_policy, load_tokenizer
    from runrl_engine.sft import run_sft

    torch.set_num_threads(a.threads)
    (work / "reward.py").write_text("def reward_fn(completion, **kw):\n    return 0.0\n")
    (work / "prompts.jsonl").write_text(json.dumps({"prompt": "unused"}) + "\n")
    cfg = RunConfig.from_dict({"model": model, "prompt_file": str(work / "prompts.jsonl"),
                               "reward_file": str(work / "reward.py"), "sft_file": str(data),
                               "sft_epochs": a.epochs, "sft_learning_rate": a.lr, "micro_batch_size": a.batch,
                               "seed": 0, "device": "cpu", "dtype": "float32", "num_threads": a.threads,
                               "padding_free": not a.ours_padded})
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    policy = load_policy(cfg, "cpu", torch.float32)
    setup = time.perf_counter() - t0
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    summary = run_sft(policy, tokenizer, cfg, work, log=lambda line: None, metrics=records.append, device="cpu")
    wall = time.perf_counter() - t0
    train = summary["sft/train_s"]  # `trainer.train()` alone; building the SFTTrainer and tokenising is setup
    return {"train_s": train, "setup_s": setup + wall - train, "steps": summary["sft/steps"],
            "loss_first": summary["sft/loss_first"], "loss_last": summary["sft/loss_last"]}


def run_trl(model_path: str, data: Path, work: Path, a: argparse.Namespace, fp32: bool) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(a.threads)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    extra = {"bf16": False, "activation_checkpointing": False} if fp32 else {}
    args = SFTConfig(output_dir=str(work / "trl"), use_cpu=True, report_to=[], num_train_epochs=a.epochs,
                     learning_rate=a.lr, per_device_train_batch_size=a.batch, seed=0, save_strategy="no",
                     disable_tqdm=True, **extra)
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(model_path))
    setup = time.perf_counter() - t0
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": wall, "setup_s": setup, "steps": trainer.state.global_step,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "train_loss": float(result.training_loss), "bf16": bool(trainer.args.bf16),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


def worker(a: argparse.Namespace) -> dict[str, Any]:
    from runrl_engine.tiny import resolve_model_path

    model = f"builtin:{a.model}"
    work = Path(a.work_dir)
    if a.worker == "ours":
        out = run_ours(model, Path(a.data), work, a)
    else:
        out = run_trl(resolve_model_path(model), Path(a.data), work, a, fp32=a.worker == "trl-fp32")
    return {"side": a.worker, **out, "peak_rss_mb": _peak_mb(), "threads": a.threads}


def token_counts(model: str, rows: list[dict[str, Any]]) -> list[int]:
    from transformers import AutoTokenizer

    from runrl_engine.tiny import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(f"builtin:{model}"))
    return [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows]


def spawn(side: str, a: argparse.Namespace, data: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"sft-bench-{side}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", side, "--work-dir", tmp, "--result", str(out), "--data", str(data),
               "--model", a.model, "--threads", str(a.threads), "--epochs", str(a.epochs), "--lr", str(a.lr),
               "--batch", str(a.batch)] + (["--ours-padded"] if a.ours_padded else [])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"side": side, "error": f"timed out after {a.timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            return {"side": side, "error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}
        return json.loads(out.read_text())


def summarize(runs: list[dict[str, Any]], n_examples: int, n_tokens: int, epochs: int) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"errors": [r["error"] for r in runs]}
    train = statistics.median(r["train_s"] for r in ok)
    return {"rounds_ok": len(ok), "train_s": train, "examples_per_s": n_examples * epochs / train,
            "tokens_per_s": n_tokens * epochs / train, "steps": ok[0]["steps"],
            "setup_s": statistics.median(r["setup_s"] for r in ok),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
            "loss_first": ok[0].get("loss_first"), "loss_last": ok[0].get("loss_last"),
            "per_round_train_s": [r["train_s"] for r in ok],
            **{k: ok[0][k] for k in ("bf16", "gradient_checkpointing") if k in ok[0]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="ours,trl", help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--examples", type=int, default=96, help="conversations in the SFT file")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="conversations per optimizer step (both sides)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--model", default="smollm2-135m-instruct", help="builtin model name")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ours-padded", action="store_true", help="ours with padding_free off (padded batches)")
    p.add_argument("--quick", action="store_true", help="builtin tiny model, 16 conversations, 1 round")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a)))
        return 0
    if a.quick:
        a.model, a.examples, a.rounds = "tiny", 16, 1
    sides = [s.strip() for s in a.sides.split(",")]
    if any(s not in SIDES for s in sides):
        p.error(f"--sides: choose from {', '.join(SIDES)}")
    rows = make_conversations(a.examples)
    lengths = token_counts(a.model, rows)
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        data = Path(tmp) / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        load_start = list(os.getloadavg())
        for r in range(a.rounds):
            for side in sides:
                res = spawn(side, a, data)
                status = res["error"].splitlines()[-1] if "error" in res else f"train {res['train_s']:.1f} s"
                print(f"[round {r + 1}/{a.rounds}] {side}: {status}", flush=True)
                runs[side].append(res)
    import torch
    import transformers
    import trl

    summary = {s: summarize(runs[s], len(rows), sum(lengths), a.epochs) for s in sides}
    print(f"\n{a.examples} conversations ({min(lengths)}-{max(lengths)} tokens, {sum(lengths)} in all), {a.epochs} "
          f"epoch(s), batch {a.batch}, model builtin:{a.model}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}; {a.threads} threads; load average "
          f"{load_start} -> {list(os.getloadavg())}")
    print(f"{'side':<9} {'train s':>8} {'ex/s':>7} {'tok/s':>8} {'steps':>6} {'rss MB':>7} {'setup s':>8}  loss first -> last")
    for s in sides:
        x = summary[s]
        if "errors" in x:
            print(f"{s:<9} FAILED: {x['errors'][0][:300]}")
            continue
        lf, ll = x["loss_first"], x["loss_last"]
        print(f"{s:<9} {x['train_s']:>8.1f} {x['examples_per_s']:>7.2f} {x['tokens_per_s']:>8.0f} {x['steps']:>6} "
              f"{x['peak_rss_mb']:>7.0f} {x['setup_s']:>8.1f}  {lf if lf is None else round(lf, 3)} -> "
              f"{ll if ll is None else round(ll, 3)}")
    final: dict[str, Any] = {"sides": summary, "examples": a.examples, "tokens": sum(lengths)}
    for s in sides:
        if s != "ours" and "examples_per_s" in summary.get("ours", {}) and "examples_per_s" in summary[s]:
            ratio = summary["ours"]["examples_per_s"] / summary[s]["examples_per_s"]
            final[f"ours_over_{s.replace('-', '_')}_examples_per_s"] = ratio
            print(f"ours / {s} examples per second: {ratio:.2f}")
    print(json.dumps(final, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
