"""Policy-gradient losses: the clipped surrogate, the k3 KL penalty, and how token losses are aggregated.

Every `loss_type` is the same per-token loss with different token weights:

    loss = sum_{b,t} weight[b, t] * per_token_loss[b, t]

and the weights use *global* denominators: `num_sequences` and `num_tokens` count the whole optimizer step
(all micro-batches of all data-parallel processes). Consequences the trainer relies on:

- splitting a batch into micro-batches and summing their losses gives the whole batch's loss (and gradient);
- with P processes each computing its local loss with global denominators, the sum over processes is the
  single-process loss. DDP *averages* gradients, so the trainer multiplies the local loss by P.

Weights per `loss_type` (L_i = selected tokens of sequence i, N = num_sequences, M = num_tokens,
C = max_completion_length):

    grpo     mask / (L_i * N)   mean over each sequence's tokens, then over sequences
    bnpo     mask / M           mean over all tokens of the step
    dapo     mask / M           same weights as bnpo (DAPO's token-level mean over the global batch)
    dr_grpo  mask / (N * C)     sum over tokens divided by a constant (Dr. GRPO)

Compared with TRL 1.16 `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py:3153-3174), which computes each
micro-batch's loss from *local* counts and divides by the gradient-accumulation steps:

- grpo, dr_grpo: identical whenever all micro-batches hold the same number of sequences (TRL's case).
- dapo: identical; TRL divides by `num_items_in_batch / num_processes` (tokens of the generation batch over all
  processes, rescaled to one accumulation window), i.e. the global token count.
- bnpo: deliberately different with more than one micro-batch. TRL divides by the *local* micro-batch token count
  (its docs: "results may slightly vary depending on the local batch size"), so bnpo is a mean of micro-batch
  means; here it is the global token mean, so the loss does not depend on how the batch is split. For a single
  micro-batch on one process both are the same number, and bnpo here equals dapo.

KL penalty (beta > 0): `beta * kl_k3(logp, ref_logp)` per token, by default multiplied by the importance ratio as
TRL 1.16 does (`use_bias_correction_kl=True`), see `policy_loss`.

Masked positions (mask 0) of `logp`, `old_logp` and `ref_logp` are replaced by 0 *before* any exp, so padding
holding garbage (even inf/NaN) changes neither the loss nor the gradients, and gets an exact-zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from runrl_engine.algorithms.masked import masked_mean, masked_sum
from runrl_engine.registry import Registry
from runrl_engine.errors import ConfigError

__all__ = [
    "LOSS_TYPES",
    "TokenWeights",
    "register_loss_type",
    "get_loss_type",
    "kl_k3",
    "clipped_surrogate",
    "token_weights",
    "policy_loss",
]

Count = int | float | Tensor
# (mask [B, T] float, *, num_sequences, num_tokens, max_completion_length) -> weights [B, T]
TokenWeights = Callable[..., Tensor]

LOSS_TYPES = Registry("loss_type", "loss_type")


def register_loss_type(name: str) -> Callable[[TokenWeights], TokenWeights]:
    """Decorator: make a token-weighting function available as `loss_type: <name>`."""
    return LOSS_TYPES.register(name)


def get_loss_type(name: str) -> TokenWeights:
    """The token-weighting function registered as `name`; ConfigError listing the valid names otherwise."""
    return LOSS_TYPES.lookup(name)


def _at_least_one(count: Count) -> Count:
    if isinstance(count, Tensor):
        return count.clamp(min=1)
    return max(count, 1)


@register_loss_type("grpo")
def _grpo_weights(
    mask: Tensor, *, num_sequences: Count, num_tokens: Count, max_completion_length: int | None
) -> Tensor:
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask / (lengths * _at_least_one(num_sequences))


@register_loss_type("bnpo")
def _bnpo_weights(
    mask: Tensor, *, num_sequences: Count, num_tokens: Count, max_completion_length: int | None
) -> Tensor:
    return mask / _at_least_one(num_tokens)


@register_loss_type("dapo")
def _dapo_weights(
    mask: Tensor, *, num_sequences: Count, num_tokens: Count, max_completion_length: int | None
) -> Tensor:
    return mask / _at_least_one(num_tokens)


@register_loss_type("dr_grpo")
def _dr_grpo_weights(
    mask: Tensor, *, num_sequences: Count, num_tokens: Count, max_completion_length: int | None
) -> Tensor:
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError(
            "loss_type 'dr_grpo' needs max_completion_length (the configured completion_length, not the padded "
            f"width of this micro-batch), got {max_completion_length!r}"
        )
    return mask / (_at_least_one(num_sequences) * max_completion_length)


def token_weights(
    mask: Tensor,
    loss_type: str,
    *,
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-token weights [B, T] for `loss_type` (see the module docstring); 0 where `mask` is 0.

    mask: [B, T]. `num_sequences` / `num_tokens`: counts over the whole optimizer step (ints or 0-d tensors);
    None means this batch's own (`B`, `mask.sum()`). `max_completion_length` is required by `dr_grpo`.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    weigh = get_loss_type(loss_type)
    m = mask.bool().to(dtype)
    return weigh(
        m,
        num_sequences=mask.shape[0] if num_sequences is None else num_sequences,
        num_tokens=m.sum() if num_tokens is None else num_tokens,
        max_completion_length=max_completion_length,
    )


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference): `exp(ref - logp) - (ref - logp) - 1` (>= 0).

    logp, ref_logp: [B, T] log-probs of the sampled tokens. Returns [B, T]. Same estimator as TRL's GRPO.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per token: `-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)`.

    logp, old_logp: [B, T]; advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
    `epsilon_high` defaults to `epsilon_low`. `mask` [B, T] (default: all tokens) only selects the tokens the
    diagnostics average over; the caller applies it to the loss.
    Returns per_token_loss [B, T] and detached diagnostics (TRL's names): `clip_ratio/low_mean` (ratio below
    1 - eps_low with A < 0), `clip_ratio/high_mean` (above 1 + eps_high with A > 0), `clip_ratio/region_mean`
    (either), `ratio_mean`, `ratio_max` (0 if no token is selected).
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low}, {epsilon_high}")
    if logp.shape != old_logp.shape or logp.dim() != 2:
        raise ValueError(f"logp and old_logp must both be [B, T]; got {tuple(logp.shape)}, {tuple(old_logp.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.shape[0] != logp.shape[0] or advantages.shape[1] not in (1, logp.shape[1]):
        raise ValueError(
            f"advantages must be [B] or [B, T] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    advantages = advantages.to(logp.dtype)

    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)

    with torch.no_grad():
        selected = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        diagnostics = {
            "clip_ratio/low_mean": masked_mean(low.to(logp.dtype), selected),
            "clip_ratio/high_mean": masked_mean(high.to(logp.dtype), selected),
            "clip_ratio/region_mean": masked_mean((low | high).to(logp.dtype), selected),
            "ratio_mean": masked_mean(ratio, selected),
            "ratio_max": torch.where(selected, ratio, torch.zeros_like(ratio)).max(),
        }
    return per_token_loss, diagnostics


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    kl_bias_correction: bool = True,
    importance_sampling_level: str = "token",
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-family policy loss: `sum(token_weights * (clipped surrogate + beta * kl))`.

    logp: [B, T] current log-probs of the sampled tokens (differentiable); old_logp: [B, T] log-probs at sampling
    time (treated as constants); advantages: [B] or [B, T] (constants); mask: [B, T], 1 = trained-on token;
    ref_logp: [B, T] reference-policy log-probs, required when beta != 0.
    kl = kl_k3(logp, ref_logp), multiplied by the (unclipped, differentiable) ratio `exp(logp - old_logp)` when
    `kl_bias_correction` is on, as TRL 1.16 does by default (`use_bias_correction_kl=True`, after DeepSeek-V3.2):
    the value barely changes, but the gradient becomes the unbiased reverse-KL gradient, `logp - ref_logp` per
    token on-policy instead of k3's `1 - exp(ref_logp - logp)`. Off restores the plain k3 penalty.
    `num_sequences`, `num_tokens`: counts over the whole optimizer step (see the module docstring), default this
    batch's; `max_completion_length`: required for `dr_grpo`. `epsilon_high` defaults to `epsilon_low`.
    `importance_sampling_level`: `token` (PPO/GRPO: one ratio per token) or `sequence` (GSPO: every token of a
    sequence uses the geometric mean of its tokens' ratios, `ppo.sequence_log_ratio`); the KL term keeps the
    per-token log-probs and, with bias correction, is weighted by the sequence ratio, differentiated through the
    mean as TRL 1.16 does (the surrogate's straight-through gradient gives the same result as TRL's there).

    Returns (loss: 0-d tensor, diagnostics: detached 0-d tensors): the clip ratios and ratio stats of
    `clipped_surrogate`, `pg_loss` (the loss without the KL term), `kl` (token mean of the KL term above over
    this batch's selected tokens, as TRL logs it; present when `ref_logp` is given) and `num_tokens` (this
    batch's selected tokens, for token-weighted averaging of the means across micro-batches).
    """
    if logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(f"logp and mask must both be [B, T]; got {tuple(logp.shape)}, {tuple(mask.shape)}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} adds a KL penalty to the reference policy, so ref_logp [B, T] is required")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")

    keep = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(keep, logp, zero)
    old_logp = torch.where(keep, old_logp.detach().to(logp.dtype), zero)

    if importance_sampling_level == "sequence":
        from runrl_engine.algorithms.ppo import sequence_log_ratio

        surrogate_logp = old_logp + sequence_log_ratio(logp, old_logp, keep)
        # the KL weight differentiates through the mean, as TRL's [B, 1] ratio does
        kl_log_ratio = masked_mean(logp - old_logp, keep, dim=1).unsqueeze(1)
    elif importance_sampling_level == "token":
        surrogate_logp = logp
        kl_log_ratio = logp - old_logp
    else:
        raise ConfigError(f"unknown importance_sampling_level {importance_sampling_level!r}; valid: sequence, token",
                          where="importance_sampling_level", fix="set importance_sampling_level to token or sequence")
    per_token_loss, diagnostics = clipped_surrogate(
        surrogate_logp,
        old_logp,
        advantages.detach(),
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        mask=keep,
    )
    weights = token_weights(
        mask,
        loss_type,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_completion_length=max_completion_length,
        dtype=logp.dtype,
    )
    pg_loss = masked_sum(weights * per_token_loss, keep)
    loss = pg_loss

    if ref_logp is not None:
        ref_logp = torch.where(keep, ref_logp.detach().to(logp.dtype), zero)
        kl = kl_k3(logp, ref_logp)
        if kl_bias_correction:
            kl = kl * torch.exp(kl_log_ratio)
        if beta != 0.0:
            loss = loss + beta * masked_sum(weights * kl, keep)
        diagnostics["kl"] = masked_mean(kl.detach(), keep)

    diagnostics["pg_loss"] = pg_loss.detach()
    diagnostics["num_tokens"] = keep.sum().to(logp.dtype)
    return loss, diagnostics
