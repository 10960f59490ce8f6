"""Policy-gradient losses: the per-token surrogates, the k3 KL penalty, and how token losses are aggregated.

A `loss_type` (TRL's name for the whole loss) is two registered parts: a *surrogate* (the per-token policy
loss, `SURROGATES`) and *token weights* (how per-token losses are aggregated, `LOSS_TYPES`):

    loss = sum_{b,t} weight[b, t] * per_token_loss[b, t]

    loss_type   surrogate   token weights
    grpo        clip        grpo (per-sequence mean)
    dr_grpo     clip        dr_grpo
    dapo        clip        dapo (global token mean)
    bnpo        clip        bnpo
    cispo       cispo       dapo, as TRL 1.16 aggregates cispo
    sapo        sapo        grpo, as TRL 1.16 aggregates sapo

Surrogates (r = exp(logp - old_logp), A = advantage; TRL 1.16 `_compute_loss`, grpo_trainer.py:3109-3125):

    clip    -min(min(r, delta) * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A)   PPO's clip; `delta` (None = off)
            is INTELLECT-2's two-sided clip: it also bounds the unclipped branch, so a token with A < 0 and a
            ratio far above 1 contributes at most `delta * |A|` and no gradient beyond it
    cispo   -sg[min(r, epsilon_high)] * A * logp   MiniMax-M1's CISPO: the IS weight is capped (at `epsilon_high`,
            an absolute bound on r, ScaleRL's eps_max, 5.0 recommended: *not* 1 + epsilon_high) and detached, so
            every token keeps a gradient A * weight * grad(logp); no token is dropped as the clip drops them
    sapo    -sigmoid(tau * (r - 1)) * 4 / tau * A  SAPO's soft gate: tau = `sapo_temperature_pos` where A > 0, else
            `sapo_temperature_neg`; the gradient weight 4 sigma (1 - sigma) is 1 on-policy and fades smoothly as
            r leaves 1, instead of the clip's hard cut-off

Per-token masks on top of `mask`: `token_mask` (top_entropy_quantile's high-entropy tokens,
`high_entropy_mask`) zeroes the surrogate of the other tokens but, as in TRL, not their KL term and not the
weights' denominators (a token outside it still counts in L_i and M).

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

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from runrl_engine.algorithms.masked import masked_mean, masked_sum
from runrl_engine.registry import Registry
from runrl_engine.errors import ConfigError

__all__ = [
    "LOSS_TYPES",
    "SURROGATES",
    "TokenWeights",
    "register_loss_type",
    "get_loss_type",
    "surrogate_of",
    "kl_k3",
    "clipped_surrogate",
    "cispo_surrogate",
    "sapo_surrogate",
    "entropy_quantile_threshold",
    "high_entropy_mask",
    "mask_truncated",
    "token_weights",
    "policy_loss",
]

Count = int | float | Tensor
# (mask [B, T] float, *, num_sequences, num_tokens, max_completion_length) -> weights [B, T]
TokenWeights = Callable[..., Tensor]

LOSS_TYPES = Registry("loss_type", "loss_type")
# surrogate name -> fn(logp, surrogate_logp, old_logp, advantages, keep, **options) -> (per_token_loss, diagnostics)
SURROGATES = Registry("loss_type", "surrogate")
LOSS_SURROGATE: dict[str, str] = {}  # loss_type -> the name of its surrogate in SURROGATES


def register_loss_type(name: str, *, surrogate: str = "clip") -> Callable[[TokenWeights], TokenWeights]:
    """Decorator: make a token-weighting function available as `loss_type: <name>`, whose per-token loss is the
    surrogate registered in `SURROGATES` as `surrogate` (default PPO's clip)."""
    register = LOSS_TYPES.register(name)

    def decorator(fn: TokenWeights) -> TokenWeights:
        register(fn)
        LOSS_SURROGATE[name] = surrogate
        return fn

    return decorator


def surrogate_of(loss_type: str) -> str:
    """The surrogate name of `loss_type` (ConfigError listing the valid loss types for an unknown one)."""
    get_loss_type(loss_type)
    return LOSS_SURROGATE[loss_type]


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


# TRL 1.16 aggregates cispo as dapo (global token mean) and sapo as grpo (per-sequence mean, then over sequences)
register_loss_type("cispo", surrogate="cispo")(_dapo_weights)
register_loss_type("sapo", surrogate="sapo")(_grpo_weights)


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


def _check_surrogate_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
    """advantages as [B, 1] or [B, T] in logp's dtype; ValueError naming the shapes otherwise."""
    if logp.shape != old_logp.shape or logp.dim() != 2:
        raise ValueError(f"logp and old_logp must both be [B, T]; got {tuple(logp.shape)}, {tuple(old_logp.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.shape[0] != logp.shape[0] or advantages.shape[1] not in (1, logp.shape[1]):
        raise ValueError(
            f"advantages must be [B] or [B, T] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    return advantages.to(logp.dtype)


def _ratio_stats(ratio: Tensor, selected: Tensor) -> dict[str, Tensor]:
    return {
        "ratio_mean": masked_mean(ratio, selected),
        "ratio_max": torch.where(selected, ratio, torch.zeros_like(ratio)).max(),
    }


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float | None = None,
    delta: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per token: `-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)`.

    logp, old_logp: [B, T]; advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
    `epsilon_high` defaults to `epsilon_low`. `delta` (two-sided clip, INTELLECT-2 / TRL's `delta`): the unclipped
    branch uses `min(ratio, delta)`, which bounds what a token with A < 0 and a large ratio contributes (and stops
    its gradient above `delta`); it must exceed 1 + eps_high, below which it would also cut A > 0 tokens.
    `mask` [B, T] (default: all tokens) only selects the tokens the diagnostics average over; the caller applies
    it to the loss.
    Returns per_token_loss [B, T] and detached diagnostics (TRL's names): `clip_ratio/low_mean` (ratio below
    1 - eps_low with A < 0), `clip_ratio/high_mean` (above 1 + eps_high with A > 0), `clip_ratio/region_mean`
    (either), `ratio_mean`, `ratio_max` (0 if no token is selected); with `delta`, also `clip_ratio/delta_mean`
    (ratio above delta with A < 0: where the two-sided bound engages).
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low}, {epsilon_high}")
    if delta is not None and delta <= 1 + epsilon_high:
        raise ValueError(f"delta must be > 1 + epsilon_high = {1 + epsilon_high:g}, got {delta}")
    advantages = _check_surrogate_inputs(logp, old_logp, advantages)

    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(unclipped * advantages, clipped * advantages)

    with torch.no_grad():
        selected = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        diagnostics = {
            "clip_ratio/low_mean": masked_mean(low.to(logp.dtype), selected),
            "clip_ratio/high_mean": masked_mean(high.to(logp.dtype), selected),
            "clip_ratio/region_mean": masked_mean((low | high).to(logp.dtype), selected),
            **_ratio_stats(ratio, selected),
        }
        if delta is not None:
            above = (ratio > delta) & (advantages < 0)
            diagnostics["clip_ratio/delta_mean"] = masked_mean(above.to(logp.dtype), selected)
    return per_token_loss, diagnostics


def cispo_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    epsilon_max: float,
    log_ratio: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO per token (MiniMax-M1; TRL 1.16 `loss_type="cispo"`): `-sg[min(ratio, epsilon_max)] * A * logp`.

    The importance weight is capped at `epsilon_max` (an absolute bound on the ratio, TRL's `epsilon_high` under
    cispo; ScaleRL recommends 5.0) and detached, so the gradient is `-weight * A * grad(logp)` at every token:
    unlike the clip, a capped token still gets a gradient. logp: [B, T] (differentiable); old_logp: [B, T];
    advantages: [B] or [B, T]; `log_ratio` [B, T]: the log importance ratio when it is not `logp - old_logp`
    (GSPO's sequence ratio); `mask` only selects what the diagnostics average over.
    Returns per_token_loss [B, T] and detached diagnostics: `cispo_clip_ratio` (TRL's: capped with A > 0),
    `clip_ratio/region_mean` (capped, either sign: the tokens whose weight the cap changed), `ratio_mean`,
    `ratio_max`.
    """
    if epsilon_max <= 0:
        raise ValueError(f"epsilon_max must be > 0, got {epsilon_max}")
    advantages = _check_surrogate_inputs(logp, old_logp, advantages)
    if log_ratio is None:
        log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio.detach())
    weight = torch.clamp(ratio, max=epsilon_max)
    per_token_loss = -weight * advantages * logp
    with torch.no_grad():
        selected = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
        capped = ratio > epsilon_max
        diagnostics = {
            "cispo_clip_ratio": masked_mean((capped & (advantages > 0)).to(logp.dtype), selected),
            "clip_ratio/region_mean": masked_mean(capped.to(logp.dtype), selected),
            **_ratio_stats(ratio, selected),
        }
    return per_token_loss, diagnostics


def sapo_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    temperature_pos: float,
    temperature_neg: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO per token (Soft Adaptive Policy Optimization; TRL 1.16 `loss_type="sapo"`):
    `-sigmoid(tau * (ratio - 1)) * 4 / tau * A`, tau = `temperature_pos` where A > 0, else `temperature_neg`.

    A smooth gate instead of the hard clip: d/d ratio of the gate is `4 sigma (1 - sigma)`, 1 at ratio 1 (the
    plain policy gradient on-policy) and falling towards 0 as the ratio moves away, faster for a larger tau.
    logp, old_logp: [B, T]; advantages: [B] or [B, T]; `mask` only selects what the diagnostics average over.
    Returns per_token_loss [B, T] and detached diagnostics: `sapo/gate_mean` (mean gradient weight
    `4 sigma (1 - sigma)` over selected tokens: 1 = on-policy), `ratio_mean`, `ratio_max`.
    """
    if temperature_pos <= 0 or temperature_neg <= 0:
        raise ValueError(f"SAPO temperatures must be > 0, got {temperature_pos}, {temperature_neg}")
    advantages = _check_surrogate_inputs(logp, old_logp, advantages)
    ratio = torch.exp(logp - old_logp)
    tau = torch.where(advantages > 0, temperature_pos, temperature_neg).to(logp.dtype)
    gate = torch.sigmoid(tau * (ratio - 1))
    per_token_loss = -gate * 4 / tau * advantages
    with torch.no_grad():
        selected = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
        diagnostics = {
            "sapo/gate_mean": masked_mean(torch.broadcast_to(4 * gate * (1 - gate), logp.shape), selected),
            **_ratio_stats(ratio, selected),
        }
    return per_token_loss, diagnostics


@SURROGATES.register("clip")
def _clip(logp: Tensor, surrogate_logp: Tensor, old_logp: Tensor, advantages: Tensor, keep: Tensor,
          **o: Any) -> tuple[Tensor, dict[str, Tensor]]:
    return clipped_surrogate(surrogate_logp, old_logp, advantages, epsilon_low=o["epsilon_low"],
                             epsilon_high=o["epsilon_high"], delta=o["delta"], mask=keep)


@SURROGATES.register("cispo")
def _cispo(logp: Tensor, surrogate_logp: Tensor, old_logp: Tensor, advantages: Tensor, keep: Tensor,
           **o: Any) -> tuple[Tensor, dict[str, Tensor]]:
    high = o["epsilon_low"] if o["epsilon_high"] is None else o["epsilon_high"]
    return cispo_surrogate(logp, old_logp, advantages, epsilon_max=high, log_ratio=surrogate_logp - old_logp,
                           mask=keep)


@SURROGATES.register("sapo")
def _sapo(logp: Tensor, surrogate_logp: Tensor, old_logp: Tensor, advantages: Tensor, keep: Tensor,
          **o: Any) -> tuple[Tensor, dict[str, Tensor]]:
    return sapo_surrogate(surrogate_logp, old_logp, advantages, temperature_pos=o["sapo_temperature_pos"],
                          temperature_neg=o["sapo_temperature_neg"], mask=keep)


def entropy_quantile_threshold(values: Tensor, quantile: float) -> Tensor:
    """`torch.quantile(values, quantile)` (linear interpolation) for a 1-d tensor of any length (torch.quantile
    refuses more than 2**24 elements); NaN for an empty one. `quantile` in [0, 1]."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    values = values.reshape(-1).float()
    n = values.numel()
    if n == 0:
        return torch.tensor(float("nan"), device=values.device)
    ordered = torch.sort(values).values
    position = quantile * (n - 1)
    lo = int(math.floor(position))
    hi = min(lo + 1, n - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def high_entropy_mask(entropies: Tensor, mask: Tensor, top_quantile: float, *,
                      threshold: Tensor | float | None = None) -> Tensor:
    """The tokens `top_entropy_quantile` trains on (TRL 1.16 `get_high_entropy_mask`, "Beyond the 80/20 Rule"):
    selected tokens whose entropy is >= the `1 - top_quantile` quantile of the selected tokens' entropies.

    entropies, mask: [B, T]; `top_quantile` in [0, 1]: 1 keeps every selected token, 0 only the highest-entropy
    one(s). `threshold`: a precomputed quantile (the trainer takes it over the whole optimizer step, all
    processes: `entropy_quantile_threshold`), default this batch's. Returns a bool [B, T], False where `mask` is 0
    and everywhere when nothing is selected.
    """
    if entropies.shape != mask.shape or entropies.dim() != 2:
        raise ValueError(f"entropies and mask must both be [B, T]; got {tuple(entropies.shape)}, {tuple(mask.shape)}")
    keep = mask.bool()
    entropies = entropies.detach()
    if threshold is None:
        threshold = entropy_quantile_threshold(entropies[keep], 1.0 - top_quantile)
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=entropies.device)
    if torch.isnan(threshold):
        return torch.zeros_like(keep)
    return (entropies.float() >= threshold) & keep


def mask_truncated(loss_mask: Tensor, truncated: Tensor) -> Tensor:
    """`mask_truncated_completions` (DAPO; TRL 1.16 zeroes a truncated completion's mask): `loss_mask` [B, T] with
    the rows where `truncated` [B] (bool) is True set to 0, so they add nothing to the loss nor to the token counts
    of its denominators. Every row truncated gives an all-zero mask: the loss is then 0 (the denominators are
    clamped to 1), never NaN. Returns a new tensor of `loss_mask`'s dtype."""
    if truncated.dim() != 1 or truncated.shape[0] != loss_mask.shape[0]:
        raise ValueError(f"truncated must be [B] for loss_mask {tuple(loss_mask.shape)}, got {tuple(truncated.shape)}")
    keep = ~truncated.to(device=loss_mask.device, dtype=torch.bool)
    return torch.where(keep.unsqueeze(1), loss_mask, torch.zeros((), dtype=loss_mask.dtype, device=loss_mask.device))


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float | None = None,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    kl_bias_correction: bool = True,
    importance_sampling_level: str = "token",
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
    token_mask: Tensor | None = None,
    sampler_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-family policy loss: `sum(token_weights * (surrogate * token_mask + beta * kl))`.

    The surrogate is `loss_type`'s (see the module docstring): the clip (with `delta`, the two-sided clip), cispo
    (`epsilon_high` is then the cap of the IS weight itself) or sapo (`sapo_temperature_pos/neg`).
    `token_mask` [B, T] (default all): tokens whose surrogate counts (top_entropy_quantile); the weights, the KL
    term and the diagnostics still use `mask`. `sampler_weights` [B, T] or [B, 1] (default none): the
    importance-sampling correction between the rollout engine and the trainer (`sampler_correction`), detached,
    multiplying each token's surrogate (not the KL term), as TRL 1.16 multiplies `per_token_loss`.

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

    Returns (loss: 0-d tensor, diagnostics: detached 0-d tensors): the surrogate's (clip ratios and ratio stats,
    see `clipped_surrogate`, `cispo_surrogate`, `sapo_surrogate`), `pg_loss` (the loss without the KL term),
    `kl` (token mean of the KL term above over this batch's selected tokens, as TRL logs it; present when
    `ref_logp` is given) and `num_tokens` (this batch's selected tokens, for token-weighted averaging of the
    means across micro-batches).
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
    surrogate = SURROGATES.lookup(surrogate_of(loss_type))
    per_token_loss, diagnostics = surrogate(
        logp, surrogate_logp, old_logp, advantages.detach(), keep, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, delta=delta, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
    )
    if token_mask is not None:
        if token_mask.shape != logp.shape:
            raise ValueError(f"token_mask must have logp's shape {tuple(logp.shape)}, got {tuple(token_mask.shape)}")
        per_token_loss = torch.where(token_mask.bool(), per_token_loss, zero)
    if sampler_weights is not None:
        per_token_loss = per_token_loss * sampler_weights.detach().to(per_token_loss.dtype)
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
