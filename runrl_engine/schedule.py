"""How many steps a run takes and which prompts each step uses: one home for the trainer and the server.

`plan_steps` is the run's length, from the training prompts that remain after the held-out split
(`held_out_count`) and after prompts longer than `max_prompt_length` are skipped. The trainer knows that count
exactly (it has tokenised the prompts); the server, which never loads a tokenizer, estimates it from the prompt
file's line count with the same functions, and shows the trainer's own number once a step record carries it
(`total_steps` in metrics.jsonl).

`PromptSchedule` and `sample_seed` make every step's prompts and every completion's seed a pure function of
(seed, step, ...), so a resumed run draws what an uninterrupted one would.

Standard library only: the server imports this module, and it must not import torch.
Not covered: dynamic sampling's refill prompts (drawn per step by the trainer, outside the epoch schedule).
"""

from __future__ import annotations

import math
import random

__all__ = ["PromptSchedule", "held_out_count", "plan_steps", "sample_seed", "steps_per_epoch"]


def held_out_count(num_prompts: int, eval_fraction: float, eval_max_prompts: int) -> int:
    """Prompts held out of `num_prompts` for evaluation when no `eval_prompt_file` is given: a fraction, capped,
    and none when that would leave no training prompt."""
    n_eval = min(eval_max_prompts, int(num_prompts * eval_fraction))
    return 0 if num_prompts - n_eval < 1 else n_eval


def steps_per_epoch(n_train_prompts: int, prompts_per_step: int) -> int:
    """Steps one pass over the training prompts takes (the last step of an epoch may wrap into the next)."""
    return max(1, math.ceil(n_train_prompts / prompts_per_step))


def plan_steps(n_train_prompts: int, prompts_per_step: int, epochs: int, max_steps: int | None) -> int:
    """The run's number of RL steps: `max_steps` when set, else `epochs` passes over the training prompts."""
    return max_steps or epochs * steps_per_epoch(n_train_prompts, prompts_per_step)


class PromptSchedule:
    """Which training prompts a step uses: an endless stream of per-epoch seeded permutations, cut into
    consecutive slices of `prompts_per_step`. A pure function of (seed, step), so resuming is exact."""

    def __init__(self, num_prompts: int, prompts_per_step: int, seed: int):
        self.n, self.per_step, self.seed = num_prompts, prompts_per_step, seed

    def _epoch(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order

    def indices(self, step: int) -> list[int]:  # step counts from 1
        start = (step - 1) * self.per_step
        out: list[int] = []
        while len(out) < self.per_step:
            epoch, offset = divmod(start + len(out), self.n)
            out.extend(self._epoch(epoch)[offset: offset + self.per_step - len(out)])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / self.n


def sample_seed(seed: int, step: int, prompt_index: int, sample_index: int, salt: int = 0) -> int:
    """A seed per completion that does not depend on how prompts are batched or split across processes."""
    return hash((seed, salt, step, prompt_index, sample_index)) & 0x7FFF_FFFF_FFFF_FFFF
