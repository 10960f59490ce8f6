"""Generate the arithmetic task of configs/smollm2_arithmetic.yaml: `train.jsonl` and a disjoint `eval.jsonl`.

Each line asks for the sum of two whole numbers ("What is 37 + 48? Answer with the number only.") and carries
the answer as `expected`, which `reward.py` compares with the last number of the completion. The two splits share
no (a, b) pair, so held-out accuracy measures addition rather than recall of the training questions.

    python configs/data/arithmetic/make_data.py            # rewrites both files next to this script
    python configs/data/arithmetic/make_data.py --low 10 --high 99 --train 2000 --eval 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

QUESTION = "What is {a} + {b}? Answer with the number only."


def rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": QUESTION.format(a=a, b=b)}], "expected": a + b} for a, b in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--low", type=int, default=10, help="smallest operand")
    ap.add_argument("--high", type=int, default=49, help="largest operand")
    ap.add_argument("--train", type=int, default=1500, help="training questions")
    ap.add_argument("--eval", type=int, default=100, help="held-out questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    pairs = [(a, b) for a in range(args.low, args.high + 1) for b in range(args.low, args.high + 1)]
    if args.train + args.eval > len(pairs):
        ap.error(f"only {len(pairs)} distinct pairs in [{args.low}, {args.high}]: ask for fewer questions")
    random.Random(args.seed).shuffle(pairs)
    held_out, train = pairs[:args.eval], pairs[args.eval:args.eval + args.train]
    for name, split in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(args.out / name, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows(split))
    print(f"wrote {len(train)} training and {len(held_out)} held-out questions to {args.out}")


if __name__ == "__main__":
    main()
