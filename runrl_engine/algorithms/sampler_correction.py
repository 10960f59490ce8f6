"""Importance-sampling correction for a rollout engine whose sampling distribution is not the trainer's.

The policy ratio of the update compares the trainer's current log-probs with its own log-probs at sampling time
(`old_logp`: recomputed, or the update's detached ones), so at the first update of a step it is exactly 1 even
when the tokens were drawn by another engine or at another precision (vLLM's kernels, bf16 sampling against fp32
training, a KV-cached decode against a full forward). That mismatch is invisible to the ratio and uncorrected.
Here it is measured and, if asked, corrected, from the log-probs the sampler itself reported (`sampler_logp`):

    r = pi_trainer(y_t) / q_sampler(y_t) = exp(old_logp - sampler_logp)           per token
    r = prod_t r_t                      = exp(sum_t (old_logp - sampler_logp))    per sequence (`sequence` level)

    tis  (truncated IS): weight = min(r, cap)
    mis  (masked IS):    weight = r where r <= cap, else 0 (the token, or every token of the sequence, drops out)

The weight is detached and multiplies each token's policy loss (not the KL term), as TRL 1.16 does
(`vllm_importance_sampling_correction`, trl/trainer/grpo_trainer.py: the ratio from `old_per_token_logps -
sampling_per_token_logps`, summed over the sequence for the `sequence_*` modes, clamped or masked at
`vllm_importance_sampling_clip_max`, multiplied into `per_token_loss` before the KL is added). TRL's mode names map
to (`importance_sampling_correction`, `importance_sampling_correction_level`): token_truncate = (tis, token),
token_mask = (mis, token), sequence_truncate = (tis, sequence), sequence_mask = (mis, sequence); its clip_max is
`importance_sampling_cap`. TRL's lower bound (`clip_min`, unset by default) is not offered.

"The sampler's distribution" is the one the tokens were actually drawn from: temperature, top-k and top-p applied
(vLLM's `processed_logprobs`, which TRL requires of its vLLM server). The trainer's log-probs are the temperature-
scaled model's, without top-k/top-p, so with top_p < 1 or top_k > 0 every ratio is at most 1 (the sampler put the
truncated mass on the kept tokens): a real difference between the two distributions, which the correction sees.

Sampler log-probs that are NaN (a token the engine did not score) count as no mismatch there (log-ratio 0, ratio 1),
as in TRL. Masked positions (mask 0) are selected away before any exp.

Diagnostics (detached 0-d tensors) use global denominators like the losses (`num_tokens`, `num_sequences`: the whole
optimizer step; default this batch's), so micro-batch values add up to the step's value; `MAX_STATS` are maxima
instead (reduce them with max):

    sampling/logp_diff_mean, _max   |old_logp - sampler_logp| over the trained tokens (TRL: sampling_logp_difference)
    sampling/kl                     token mean of k3 = r - 1 - log r, an estimate of KL(sampler || trainer) >= 0
                                    from the sampler's own tokens
    sampling/is_ratio_mean, _max    the ratio r before capping, over tokens (`token`) or sequences (`sequence`)
    sampling/is_capped_fraction     the fraction of tokens / sequences with r > cap (truncated by tis, masked by
                                    mis); with mode `none`, the fraction that the cap would touch
"""

from __future__ import annotations

import torch
from torch import Tensor

from runrl_engine.algorithms.masked import masked_sum

__all__ = ["CORRECTION_MODES", "CORRECTION_LEVELS", "MAX_STATS", "SHARE_STATS", "sampler_log_ratio",
           "importance_weights", "sampler_correction"]

CORRECTION_MODES = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")
MAX_STATS = ("sampling/logp_diff_max", "sampling/is_ratio_max")
SHARE_STATS = ("sampling/logp_diff_mean", "sampling/kl", "sampling/is_ratio_mean", "sampling/is_capped_fraction")

Count = int | float | Tensor


def sampler_log_ratio(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """log(pi_trainer / q_sampler) of each sampled token [B, T] (float32, detached): 0 where `mask` is 0 or the
    sampler's log-prob is NaN. trainer_logp, sampler_logp, mask: [B, T]."""
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.shape != mask.shape or mask.dim() != 2:
        raise ValueError(f"trainer_logp, sampler_logp and mask must all be [B, T]; got {tuple(trainer_logp.shape)}, "
                         f"{tuple(sampler_logp.shape)}, {tuple(mask.shape)}")
    sampler = sampler_logp.detach().float()
    keep = mask.bool() & ~torch.isnan(sampler)
    zero = torch.zeros((), dtype=torch.float32, device=sampler.device)
    return torch.where(keep, trainer_logp.detach().float(), zero) - torch.where(keep, sampler, zero)


def importance_weights(log_ratio: Tensor, *, mode: str, cap: float) -> tuple[Tensor, Tensor]:
    """(weights, capped) for log-ratios of any shape: `tis` min(r, cap), `mis` r where r <= cap else 0, `none`
    all 1; `capped` is r > cap (bool). r = exp(log_ratio)."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown importance_sampling_correction {mode!r}; valid: {', '.join(CORRECTION_MODES)}")
    if not cap > 0:
        raise ValueError(f"importance_sampling_cap must be > 0, got {cap}")
    ratio = torch.exp(log_ratio)
    capped = ratio > cap
    if mode == "tis":
        weights = ratio.clamp(max=cap)
    elif mode == "mis":
        weights = torch.where(capped, torch.zeros_like(ratio), ratio)
    else:
        weights = torch.ones_like(ratio)
    return weights, capped


def sampler_correction(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, mode: str, level: str = "token",
                       cap: float = 2.0, num_tokens: Count | None = None,
                       num_sequences: Count | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The weights that multiply each token's policy loss, and the mismatch diagnostics (module docstring).

    trainer_logp: [B, T] the trainer's log-probs of the sampled tokens at sampling time (`old_logp`); sampler_logp:
    [B, T] the rollout engine's (NaN: unknown); mask: [B, T], 1 = trained-on token. `level`: `token` (one ratio per
    token) or `sequence` (one per sequence: the product of its tokens' ratios). Returns weights [B, T] (`token`) or
    [B, 1] (`sequence`), detached, 1 everywhere for mode `none`; masked positions of a `token`-level result are 1
    (the loss has them at 0 anyway).
    """
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"unknown importance_sampling_correction_level {level!r}; "
                         f"valid: {', '.join(CORRECTION_LEVELS)}")
    keep = mask.bool()
    log_ratio = sampler_log_ratio(trainer_logp, sampler_logp, mask)
    n_tok = keep.sum() if num_tokens is None else num_tokens
    n_seq = mask.shape[0] if num_sequences is None else num_sequences
    n_tok = n_tok.clamp(min=1) if isinstance(n_tok, Tensor) else max(n_tok, 1)
    n_seq = n_seq.clamp(min=1) if isinstance(n_seq, Tensor) else max(n_seq, 1)
    if level == "sequence":
        log_ratio_at_level = log_ratio.sum(dim=1, keepdim=True)
        selected, count = torch.ones_like(log_ratio_at_level, dtype=torch.bool), n_seq
    else:
        log_ratio_at_level, selected, count = log_ratio, keep, n_tok
    weights, capped = importance_weights(log_ratio_at_level, mode=mode, cap=cap)
    ratio = torch.exp(log_ratio_at_level)
    zero = torch.zeros((), dtype=torch.float32, device=log_ratio.device)
    token_ratio = torch.exp(log_ratio)
    diagnostics = {
        "sampling/logp_diff_mean": masked_sum(log_ratio.abs(), keep) / n_tok,
        "sampling/logp_diff_max": torch.where(keep, log_ratio.abs(), zero).max() if keep.numel() else zero,
        "sampling/kl": masked_sum(token_ratio - 1 - log_ratio, keep) / n_tok,
        "sampling/is_ratio_mean": masked_sum(ratio, selected) / count,
        "sampling/is_ratio_max": torch.where(selected, ratio, zero).max() if selected.numel() else zero,
        "sampling/is_capped_fraction": masked_sum(capped.float(), selected) / count,
    }
    if level == "token":
        weights = torch.where(keep, weights, torch.ones_like(weights))
    return weights.detach(), {k: v.detach() for k, v in diagnostics.items()}
