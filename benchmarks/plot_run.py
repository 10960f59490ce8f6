"""Plot a run's training reward and held-out eval score per step from its metrics.jsonl into a PNG.

    python benchmarks/plot_run.py runs/smollm2-arithmetic/metrics.jsonl benchmarks/smollm2_arithmetic.png
    python benchmarks/plot_run.py RUN/metrics.jsonl OUT.png --compare /tmp/learn_s0.json   # + the TRL curve

Needs matplotlib (`pip install matplotlib`; not a dependency of the engine). `--compare` takes the JSON that
benchmarks/real_model_learning.py writes with `--json` and adds both sides' held-out curves of its first seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--compare", type=Path, default=None)
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_reward_mean" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], color="#9ab", lw=1,
            label="training reward (mean of the step's samples)")
    ax.plot([r["step"] for r in evals], [r["eval_reward_mean"] for r in evals], "o-", color="#c33", lw=2,
            label="held-out accuracy (greedy)")
    if args.compare:
        data = json.loads(args.compare.read_text())
        first = data["results"][sorted(data["results"])[0]]
        for side, color in (("ours", "#1a6"), ("trl", "#36c")):
            curve = sorted((int(k), v) for k, v in first[side]["eval"].items())
            ax.plot([k for k, _ in curve], [v for _, v in curve], "s--", color=color, lw=1.5,
                    label=f"held-out accuracy, {side} (real_model_learning.py)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(args.title or args.metrics.parent.name)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
