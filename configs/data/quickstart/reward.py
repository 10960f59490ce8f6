"""Quickstart reward: the share of the reply's characters that are the row's `letter`.

A toy task a randomly initialised tiny model can learn in a few minutes on a CPU. It shows the contract:
`reward_fn(completion, **row)` gets the completion text and every field of the prompt's JSONL line, and
may return `(score, info)`; numbers in `info` are charted per step, strings are sampled into completions.
"""


def reward_fn(completion: str, **row) -> tuple[float, dict]:
    letter = row.get("letter", "a")
    text = completion.strip()
    if not text:
        return 0.0, {"chars": 0.0, "verdict": "empty"}
    share = text.count(letter) / len(text)
    verdict = "mostly " + letter if share >= 0.5 else "mixed"
    return share, {"chars": float(len(text)), "verdict": verdict}
