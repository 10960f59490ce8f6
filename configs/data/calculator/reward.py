"""Calculator reward: 1 for the right sum inside <answer></answer>, 0.2 for the format alone."""

import re

ANSWER = re.compile(r"<answer>\s*(-?\d+(?:\.\d+)?)\s*</answer>")


def reward_fn(completion: str, **row) -> tuple[float, dict]:
    match = ANSWER.search(completion)
    if not match:
        return 0.0, {"formatted": 0.0, "correct": 0.0}
    correct = float(match.group(1)) == float(row["answer"])
    return (1.0 if correct else 0.2), {"formatted": 1.0, "correct": float(correct)}
