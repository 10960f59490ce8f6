"""Generate the tool-use task of configs/smollm2_calculator.yaml: 3-digit x 2-digit products with an MCP calculator.

Writes, next to this script:
- `sft.jsonl`: conversations that show the protocol once per example: the user asks for a product, the assistant
  calls the `multiply` tool in a `<tool_call>` block, the tool answers (as examples/mcp_calculator.py does, a float
  such as "29842.0") and the assistant gives the integer inside <answer></answer>;
- `train.jsonl` and `eval.jsonl`: RL prompts and held-out prompts (no (a, b) pair shared by any two files), each
  with its `answer`.

    python configs/data/smollm2_calculator/make_data.py
    python configs/data/smollm2_calculator/make_data.py --sft 32 --train 400 --eval 50 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are a careful calculator. Use the multiply tool to multiply, then give the result inside <answer></answer>."
QUESTION = "What is {a} * {b}?"


def prompt(a: int, b: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION.format(a=a, b=b)}]


def conversation(a: int, b: int) -> dict:
    call = json.dumps({"name": "multiply", "arguments": {"a": a, "b": b}})
    return {"messages": prompt(a, b) + [
        {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
        {"role": "tool", "content": f"{float(a * b)}"},
        {"role": "assistant", "content": f"<answer>{a * b}</answer>"}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", type=int, default=32, help="SFT conversations")
    ap.add_argument("--train", type=int, default=400, help="RL prompts")
    ap.add_argument("--eval", type=int, default=50, help="held-out prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < args.sft + args.train + args.eval:
        pairs.add((rng.randint(100, 999), rng.randint(10, 99)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    sft, rest = ordered[:args.sft], ordered[args.sft:]
    held_out, train = rest[:args.eval], rest[args.eval:]
    files = {"sft.jsonl": [conversation(a, b) for a, b in sft],
             "train.jsonl": [{"prompt": prompt(a, b), "answer": a * b} for a, b in train],
             "eval.jsonl": [{"prompt": prompt(a, b), "answer": a * b} for a, b in held_out]}
    for name, rows in files.items():
        with open(args.out / name, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(sft)} SFT conversations, {len(train)} training and {len(held_out)} held-out prompts "
          f"to {args.out}")


if __name__ == "__main__":
    main()
