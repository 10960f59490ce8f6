"""DAPO's reward and sampling pieces (Yu et al. 2025, https://arxiv.org/abs/2503.14476), as pure functions.

- `soft_overlong_penalty`: the soft overlong punishment (the paper's Eq. 13; TRL 1.16's
  `trl.rewards.get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`, same values): with
  L_max = `max_length` and L_cache = `buffer_length`, a completion of |y| tokens gets

      0                                   |y| <= L_max - L_cache
      ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max   (linear, -1 at L_max)
      -1                                  |y| > L_max

  times `factor` (verl's `overlong_buffer.penalty_factor`; 1 in the paper and in TRL). L_cache = 0 is a hard
  cut: 0 up to L_max, -1 beyond.
- `varied_groups`: which groups of a step's rewards are not all equal (dynamic sampling keeps only those: a group
  whose rewards are all equal has advantage exactly 0 under every group-relative estimator, so it adds nothing
  but noise to the loss denominators). "Equal" is exact float equality, the same test the advantage estimators
  use to pin such groups to 0.
- `refill_prompts`: how many prompts the next dynamic-sampling round generates.

The trainer (`trainer.py`, the reward phase) adds the penalty to each training reward before dynamic sampling
and advantages, and runs the rounds; see README "DAPO".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

__all__ = ["refill_prompts", "soft_overlong_penalty", "varied_groups"]


def soft_overlong_penalty(lengths: Sequence[int] | Tensor, max_length: int, buffer_length: int,
                          factor: float = 1.0) -> list[float]:
    """The penalty (<= 0) of each completion length; see the module docstring for the formula."""
    if max_length < 1 or not 0 <= buffer_length <= max_length:
        raise ValueError(f"need max_length >= 1 and 0 <= buffer_length <= max_length, got {max_length}, "
                         f"{buffer_length}")
    start = max_length - buffer_length
    out = []
    for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths):
        if n <= start:
            p = 0.0
        elif n <= max_length:
            p = (start - n) / buffer_length
        else:
            p = -1.0
        out.append(p * factor)
    return out


def varied_groups(rewards: Tensor, group_size: int) -> Tensor:
    """rewards [N] (groups of `group_size` contiguous) -> bool [N / group_size]: True where a group's rewards are
    not all equal."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into whole groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    return ~(grouped == grouped[:, :1]).all(dim=1)


def refill_prompts(missing: int, kept: int, generated: int, limit: int) -> int:
    """Prompts the next round generates to fill `missing` groups: `missing` divided by the share of groups kept
    so far this step (`kept` of `generated`), so one round is expected to suffice; `limit` (the step's prompt
    count) when nothing was kept yet, and never more than `limit`."""
    if missing <= 0:
        return 0
    if kept <= 0 or generated <= 0:
        return limit
    return min(limit, math.ceil(missing * generated / kept))
