"""What a step's record says about its episodes: rewards, lengths, errors, truncation, turns, tools, and the
numeric `info` the reward function returned, each process's share summarized and the shares merged.

`episode_summary` runs on each process over its own episodes and returns plain Python (so accelerate's
`gather_object` can carry it); `merged_stats` turns the gathered summaries into the record's keys. The
optimizer's statistics, phase times, memory and sandbox counts are added by the trainer (`update.py` owns the
first); the record's schema is DESIGN.md's. Not covered: completions.jsonl (the trainer's `_log_completions`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from runrl_engine.rollout.episodes import Episode


def episode_summary(episodes: Sequence[Episode]) -> dict[str, Any]:
    """One process's episodes, reduced to what `merged_stats` needs; `info` holds [sum, count] per numeric key."""
    info: dict[str, list[float]] = {}
    for ep in episodes:
        for k, v in ep.info.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                total = info.setdefault(k, [0.0, 0.0])
                total[0] += float(v)
                total[1] += 1
    return {"rewards": [ep.reward for ep in episodes], "lengths": [sum(ep.mask) for ep in episodes],
            "errors": sum(ep.error is not None for ep in episodes),
            "truncated": sum(not ep.finished for ep in episodes), "info": info,
            "turns": sum(ep.turns for ep in episodes), "tool_calls": sum(ep.tool_calls for ep in episodes),
            "tool_errors": sum(ep.tool_errors for ep in episodes)}


def merged_stats(parts: Sequence[dict[str, Any]], *, env_mode: bool, tools: bool, step_time: float
                 ) -> dict[str, Any]:
    """The record's episode keys from every process's `episode_summary` (at least one episode in all)."""
    rewards = [r for p in parts for r in p["rewards"]]
    lengths = [n for p in parts for n in p["lengths"]]
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(n - 1, 1))
    gen_tokens = sum(lengths)
    stats: dict[str, Any] = {
        "reward_mean": mean, "reward_std": std, "reward_min": min(rewards), "reward_max": max(rewards),
        ("env_errors" if env_mode else "reward_errors"): sum(p["errors"] for p in parts),
        "completion_length_mean": gen_tokens / n, "completion_length_min": min(lengths),
        "completion_length_max": max(lengths), "truncated_fraction": sum(p["truncated"] for p in parts) / n,
        "step_time_s": step_time, "tokens_per_s": gen_tokens / step_time if step_time > 0 else 0.0,
    }
    if env_mode or tools:
        stats["turns_per_episode"] = sum(p["turns"] for p in parts) / n
    if tools:
        stats["tool_calls_per_episode"] = sum(p["tool_calls"] for p in parts) / n
        stats["tool_errors"] = sum(p["tool_errors"] for p in parts)
    info: dict[str, list[float]] = {}
    for p in parts:
        for k, (total, count) in p["info"].items():
            merged = info.setdefault(k, [0.0, 0.0])
            merged[0] += total
            merged[1] += count
    stats.update({f"reward_info/{k}": total / count for k, (total, count) in info.items() if count})
    return stats
