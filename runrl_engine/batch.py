"""The one batch type the update phase consumes.

Layout (the same for single- and multi-turn rollouts): `[left pad][prompt][completion][right pad]`.
The "completion" is everything after the initial prompt: for a multi-turn episode it holds the assistant
turns *and* the observation/tool turns between them; `loss_mask` says which of its tokens the policy
sampled (1) and which it did not (0). Per-token tensors are aligned to completion tokens: index `t` is the
log-probability of `completion_ids[:, t]` given everything before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from runrl_engine.rollout.episodes import Episode


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, C] long, right-padded
    completion_mask: torch.Tensor  # [B, C] long, 1 on real completion tokens (attention)
    loss_mask: torch.Tensor  # [B, C] float, 1 on tokens sampled by the policy and trained on, else 0
    advantages: torch.Tensor  # [B] float, one per sequence; or [B, C] per token (GAE)
    rewards: torch.Tensor  # [B] float
    old_logp: torch.Tensor | None = None  # [B, C] float, log-probs under the sampling policy (None: on-policy)
    ref_logp: torch.Tensor | None = None  # [B, C] float, log-probs under the reference policy
    old_values: torch.Tensor | None = None  # [B, C] float, critic values at sampling time (PPO)
    returns: torch.Tensor | None = None  # [B, C] float, value targets (PPO)
    # [B, C] float, the rollout engine's log-probs of the sampled tokens under the distribution it drew them from
    # (NaN where it reported none; 0 on mask-0 positions); None: the backend reports none
    sampler_logp: torch.Tensor | None = None
    truncated: torch.Tensor | None = None  # [B] bool, completions that did not end by themselves (not `finished`)

    @classmethod
    def from_episodes(cls, episodes: Sequence["Episode"], pad_id: int, device: torch.device | str) -> "RolloutBatch":
        """A step's episodes as one padded batch: rewards as given, advantages zero (the update fills them in),
        `truncated` where an episode did not end by itself, and the rollout engine's log-probs where it reported
        any."""
        prompt_ids, prompt_mask = pad_left([ep.prompt_ids for ep in episodes], pad_id)
        rewards = torch.tensor([ep.reward for ep in episodes], dtype=torch.float32)
        reported = any(m and not math.isnan(x) for ep in episodes for x, m in zip(ep.sampler_logprobs, ep.mask))
        return cls(
            prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
            completion_ids=pad_right([ep.tokens for ep in episodes], pad_id).to(device),
            completion_mask=pad_right([[1] * len(ep.tokens) for ep in episodes], 0).to(device),
            loss_mask=pad_right([[float(m) for m in ep.mask] for ep in episodes], 0.0, torch.float32).to(device),
            advantages=torch.zeros_like(rewards).to(device), rewards=rewards.to(device),
            sampler_logp=(pad_right([ep.sampler_logprobs for ep in episodes], 0.0, torch.float32).to(device)
                          if reported else None),
            truncated=torch.tensor([not ep.finished for ep in episodes], dtype=torch.bool, device=device))

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:  # [B, P + C]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [B, P + C]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:  # [B, P + C], 0 at each row's first real token (matches decoding)
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def select(self, index: torch.Tensor) -> "RolloutBatch":
        """Rows `index`, with padding trimmed to what those rows need (cheaper micro-batches)."""
        pm, cm = self.prompt_mask[index], self.completion_mask[index]
        p_keep = int(pm.sum(dim=1).max().item())
        c_keep = max(int(cm.sum(dim=1).max().item()), 1)
        P = pm.shape[1]

        def p(t: torch.Tensor) -> torch.Tensor:
            return t[index][:, P - p_keep:]

        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index][:, :c_keep]

        return replace(self, prompt_ids=p(self.prompt_ids), prompt_mask=p(self.prompt_mask),
                       completion_ids=c(self.completion_ids), completion_mask=c(self.completion_mask),
                       loss_mask=c(self.loss_mask), rewards=self.rewards[index],
                       advantages=c(self.advantages) if self.advantages.dim() == 2 else self.advantages[index],
                       old_logp=c(self.old_logp), ref_logp=c(self.ref_logp), old_values=c(self.old_values),
                       sampler_logp=c(self.sampler_logp),
                       returns=c(self.returns), truncated=None if self.truncated is None else self.truncated[index])

    def prompt_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows that share a prompt: (`first` [U], the first row holding each distinct prompt; `group` [B], each
        row's index into `first`). The G completions of one prompt form one group, wherever they sit."""
        _, group = torch.unique(torch.cat([self.prompt_ids, self.prompt_mask], dim=1), dim=0, return_inverse=True)
        rows = torch.arange(len(self), device=group.device)
        first = torch.full((int(group.max()) + 1,), len(self), device=group.device).scatter_reduce(
            0, group, rows, reduce="amin")
        return first, group

    def micro_batch_indices(self, size: int, share_prompts: bool = False) -> list[torch.Tensor]:
        """Row indices of length-bucketed micro-batches: rows sorted by total length so padding stays small.

        With `share_prompts` (each distinct prompt of a micro-batch computed once, `forward.completion_outputs`) a
        second layout is considered, the rows of one prompt kept together (groups ordered by their longest row,
        rows by length inside a group), and the one computing fewer positions is used: per micro-batch, its
        distinct prompts x prompt width + rows x longest completion. With distinct prompts both are the same."""
        lengths = self.prompt_mask.sum(dim=1) + self.completion_mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True)
        layouts = [order]
        if share_prompts:
            first, group = self.prompt_groups()
            longest = torch.zeros_like(first).scatter_reduce(0, group, lengths, reduce="amax")
            grouped = order
            # sort keys, least significant first (stable sorts): own length, then group, then the group's longest
            for key in (first[group], -longest[group]):
                grouped = grouped[torch.argsort(key[grouped], stable=True)]
            layouts.append(grouped)
            layouts.sort(key=lambda o: self._positions(o, size, group))  # stable: plain order on a tie
        return [layouts[0][i:i + size] for i in range(0, len(self), size)]

    def _positions(self, order: torch.Tensor, size: int, group: torch.Tensor) -> int:
        """Positions a shared-prompt forward computes over micro-batches of `order`."""
        prompt_len, completion_len = self.prompt_mask.sum(dim=1), self.completion_mask.sum(dim=1)
        total = 0
        for i in range(0, len(order), size):
            rows = order[i:i + size]
            groups = group[rows].unique()
            total += int(groups.numel()) * int(prompt_len[rows].max()) + len(rows) * int(completion_len[rows].max())
        return total

    def micro_batches(self, size: int, share_prompts: bool = False) -> list["RolloutBatch"]:
        """Length-bucketed micro-batches (`micro_batch_indices`), padding trimmed."""
        return [self.select(index) for index in self.micro_batch_indices(size, share_prompts)]


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_value: float | int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    width = max(max((len(s) for s in seqs), default=0), 1)
    out = torch.full((len(seqs), width), pad_value, dtype=dtype)
    for i, s in enumerate(seqs):
        if s:
            out[i, : len(s)] = torch.tensor(s, dtype=dtype)
    return out
