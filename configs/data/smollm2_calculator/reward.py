"""Calculator reward: 1 when the number inside <answer></answer> is the exact product, else 0.

No credit for the format or for calling the tool, so the reward is the accuracy the eval reports; whether the
model called the tool is counted in the trainer's `tool_calls_per_episode`.
"""

import re

ANSWER = re.compile(r"<answer>\s*(-?\d+(?:\.\d+)?)\s*</answer>")


def reward_fn(completion: str, answer: int, **row) -> tuple[float, dict]:
    match = ANSWER.search(completion)
    correct = bool(match) and float(match.group(1)) == float(answer)
    return float(correct), {"correct": float(correct), "formatted": float(bool(match))}
