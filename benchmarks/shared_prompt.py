"""The update phase with and without the shared-prompt forward (`share_prompt_forward`), alternated in one process.

    python benchmarks/shared_prompt.py                          # W1's batch, 1 thread
    python benchmarks/shared_prompt.py --workload W2 --threads 2
    python benchmarks/shared_prompt.py --system-words 60        # W1 with a long system prompt
    python benchmarks/shared_prompt.py --quick                  # tiny model (tests/benchmarks)

Builds our trainer with `grpo_vs_trl.py`'s config for a workload (micro-batches of 8), takes the first step's
rollout batch (rollout, reward, advantages: the trainer's own phases), then times `Trainer._optimizer_step` on
that same batch, alternating shared and plain, and prints the medians and their ratio as one JSON line. The
optimizer steps move the weights, so later calls see slightly different numbers; both settings see the same drift.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_vs_trl as bench  # noqa: E402


def measure(workload: str, threads: int, system_words: int, calls: int, quick: bool) -> dict:
    import torch

    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    w = bench.WORKLOADS[workload]
    if quick:
        w = bench.quick(w)
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="shared-prompt-"))
    prompt_file, reward_file = bench.write_inputs(work)
    if system_words:
        rng = random.Random(0)
        system = " ".join(rng.choice(bench.WORDS) for _ in range(system_words))
        prompt_file.write_text("".join(
            json.dumps({"prompt": [{"role": "system", "content": system}, {"role": "user", "content": text}]}) + "\n"
            for text in bench.make_prompts()))
    cfg = bench.ours_config(replace(w, steps=1), prompt_file, reward_file, threads)
    trainer = Trainer(build_run(cfg, work / "run"))
    try:
        episodes = trainer._rollout(trainer._my_prompts(1), 1)
        trainer._score(episodes)
        batch = trainer._collate(episodes)
        trainer.updater.advantages(batch, episodes, step_rewards=False)
        trainer.updater.model.train()
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(calls + 1):
            for share in (True, False):
                trainer.cfg.share_prompt_forward = share
                t0 = time.perf_counter()
                trainer.updater.optimizer_step(batch)
                if i:  # the first call of each is a warm-up
                    times[share].append(time.perf_counter() - t0)
    finally:
        trainer.close()
    shared, plain = statistics.median(times[True]), statistics.median(times[False])
    return {"workload": w.name, "threads": threads, "system_words": system_words,
            "prompt_tokens_mean": float(batch.prompt_mask.sum(1).float().mean()),
            "completion_tokens_mean": float(batch.completion_mask.sum(1).float().mean()),
            "micro_batch_size": cfg.micro_batch_size, "shared_s": shared, "plain_s": plain, "ratio": shared / plain,
            "shared_all_s": times[True], "plain_all_s": times[False]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("W1", "W2"), default="W1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--system-words", type=int, default=0, help="prepend a system prompt of this many words")
    p.add_argument("--calls", type=int, default=4, help="timed update calls per setting")
    p.add_argument("--quick", action="store_true", help="tiny model, short completions (smoke test)")
    a = p.parse_args(argv)
    out = measure(a.workload, a.threads, a.system_words, a.calls, a.quick)
    print(f"{out['workload']}: prompt {out['prompt_tokens_mean']:.0f} / completion {out['completion_tokens_mean']:.0f} "
          f"tokens, micro-batch {out['micro_batch_size']}, {out['threads']} thread(s): update shared "
          f"{out['shared_s']:.3f} s, plain {out['plain_s']:.3f} s, ratio {out['ratio']:.2f}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
