"""Math reward: 1 for the right number inside <answer></answer>, 0.1 for the right format, else 0."""

import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def reward_fn(completion: str, **row) -> tuple[float, dict]:
    match = ANSWER.search(completion)
    if not match:
        return 0.0, {"formatted": 0.0}
    correct = match.group(1).strip() == str(row.get("expected_result"))
    return (1.0 if correct else 0.1), {"formatted": 1.0, "correct": float(correct)}
