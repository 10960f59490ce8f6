"""Exact-answer reward for the arithmetic task: 1.0 when the last number in the completion is the expected sum.

Taking the last number accepts both "85" and "37 + 48 = 85"; a completion that restates the question and stops
("37 + 48 =") scores 0. No partial credit: the reward is the accuracy the eval reports.
"""

import re

NUMBER = re.compile(r"-?\d+")


def reward_fn(completion: str, expected: int, **row) -> tuple[float, dict]:
    numbers = NUMBER.findall(completion.replace(",", ""))
    correct = bool(numbers) and int(numbers[-1]) == int(expected)
    return float(correct), {"correct": float(correct), "answered": float(bool(numbers))}
