"""PPO-with-a-critic math: per-token rewards, GAE advantages, the clipped value loss, PPO diagnostics, and the
sequence-level (GSPO) importance ratio.

Pure functions on tensors, same conventions as the rest of `algorithms/`: mask 1 = a token sampled by the policy
and trained on; 0 = prompt, observation/tool output or padding. Masked positions are selected away with
`torch.where` *before* any arithmetic, so garbage there (even inf/NaN) changes no value and gets an exact-zero
gradient. Losses take an optional global `num_tokens` (the whole optimizer step's selected tokens, all
micro-batches and processes), as `policy_loss` does, so micro-batch losses sum to the whole batch's loss.

How the pieces compose in a PPO step (the trainer owns the order; nothing here keeps state):

    rewards = token_level_rewards(seq_rewards, mask, kl=logp_old - ref_logp, kl_coef=beta)   # kl_in_reward
    advantages, returns = ppo_advantages(rewards, old_values, mask, gamma=gamma, lam=lam)
    ... per minibatch, per ppo epoch:
    pg, pg_diag = policy_loss(logp, old_logp, advantages, mask, loss_type=..., epsilon_low=..., num_tokens=M)
    vf, vf_diag = value_loss(values, old_values, returns, mask, value_clip=c, num_tokens=M)
    loss = combined_loss(pg, entropy=masked_entropy(entropy, mask, num_tokens=M), entropy_coef=ce, value=vf, vf_coef=cv)

GAE is registered as the critic estimator `gae` in `advantages.py` (`uses_critic("gae")` is true): its inputs
are per-token rewards, critic values and the mask rather than one reward per completion.

Across data-parallel processes, whiten with the batch-wide statistics: `whiten(x, mask, mean=..., var=...)`
takes the mean and variance the caller reduced over all processes (`whiten_stats` gives each process's sums).

Not covered here: the value head or critic model (`runrl_engine/value.py`), minibatching, logging.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from runrl_engine.algorithms.advantages import gae
from runrl_engine.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "turn_end_positions",
    "token_level_rewards",
    "ppo_advantages",
    "value_loss",
    "explained_variance",
    "explained_variance_from",
    "combined_loss",
    "approx_kl",
    "masked_entropy",
    "sequence_log_ratio",
    "sequence_importance_ratio",
    "whiten_stats",
    "whiten",
]

Count = int | float | Tensor


def _check_2d(name: str, x: Tensor, like: Tensor) -> None:
    if x.shape != like.shape or x.dim() != 2:
        raise ValueError(f"{name} must be [B, T] with the mask's shape {tuple(like.shape)}, got {tuple(x.shape)}")


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _denominator(num_tokens: Count | None, keep: Tensor, dtype: torch.dtype) -> Tensor | float:
    if num_tokens is None:
        return keep.sum().to(dtype).clamp(min=1)
    if isinstance(num_tokens, Tensor):
        return num_tokens.to(dtype).clamp(min=1)
    return max(float(num_tokens), 1.0)


def _turn_ends(keep: Tensor) -> Tensor:
    """[B, T] bool: a selected token whose successor is unselected (or the row's end)."""
    after = torch.zeros_like(keep)
    after[:, :-1] = keep[:, 1:]
    return keep & ~after


def turn_end_positions(loss_mask: Tensor) -> list[list[int]]:
    """Index of the last token of each assistant turn, per row: the last 1 of every contiguous run of 1s.

    loss_mask: [B, T]. Returns B lists of increasing token indices (empty for a row with no sampled token), in
    turn order, so a rollout can pair them with its per-step rewards: `zip(ends[b], step_rewards[b])`.
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [B, T], got shape {tuple(loss_mask.shape)}")
    ends = _turn_ends(loss_mask.bool())
    return [torch.nonzero(row, as_tuple=False).flatten().tolist() for row in ends]


def token_level_rewards(
    sequence_rewards: Tensor | None,
    loss_mask: Tensor,
    *,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    turn_rewards: Sequence[tuple[int, int, float]] | Tensor | None = None,
) -> Tensor:
    """Per-token rewards for GAE: the episode's reward(s) on sampled tokens, minus `kl_coef * kl` per token.

    sequence_rewards: [B], one reward per episode, placed on the row's last sampled token (mask 1). A row with no
    sampled token has nowhere to hold its reward, which is dropped (it trains nothing either way).
    loss_mask: [B, T]. turn_rewards (multi-turn, instead of `sequence_rewards`): step rewards at the end of each
    assistant turn, either `(row, token_index, reward)` triples (rewards at the same position add up) or a
    [B, T] tensor. `turn_end_positions(loss_mask)` gives the positions. Every reward must sit on a sampled token:
    GAE skips mask-0 tokens, so a reward on an observation token would silently vanish; that raises instead.
    Pass one of `sequence_rewards` and `turn_rewards`: an environment episode's reward is the sum of its step
    rewards, so passing both would count it twice.
    kl: [B, T] per-token KL estimate to the reference (`kl_in_reward`; usually k1 `old_logp - ref_logp`, or
    `kl_k3`), subtracted times `kl_coef` on sampled tokens only. Garbage in `kl` at mask-0 positions is ignored.

    Returns [B, T] float rewards (sequence_rewards' dtype if floating, else float32), 0 wherever the mask is 0,
    detached (rewards are constants to the losses).
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [B, T], got shape {tuple(loss_mask.shape)}")
    if (sequence_rewards is None) == (turn_rewards is None):
        raise ValueError(
            "pass exactly one of sequence_rewards (one reward per episode) and turn_rewards (step rewards at "
            "turn ends); an episode's reward is the sum of its step rewards, so both would count it twice"
        )
    keep = loss_mask.bool()
    batch, width = keep.shape
    dtype = torch.float32
    if sequence_rewards is not None and sequence_rewards.is_floating_point():
        dtype = sequence_rewards.dtype
    rewards = torch.zeros(batch, width, dtype=dtype, device=loss_mask.device)

    if sequence_rewards is not None:
        if sequence_rewards.shape != (batch,):
            raise ValueError(f"sequence_rewards must be [B] = [{batch}], got shape {tuple(sequence_rewards.shape)}")
        if not torch.isfinite(sequence_rewards).all():
            raise ValueError("sequence_rewards contain NaN or inf")
        has_token = keep.any(dim=1)
        # Last selected index: the first True of the row read backwards.
        last = width - 1 - keep.flip(1).to(torch.int8).argmax(dim=1)
        rows = torch.nonzero(has_token, as_tuple=False).flatten()
        rewards[rows, last[rows]] = sequence_rewards.detach().to(dtype)[rows]
    elif isinstance(turn_rewards, Tensor):
        _check_2d("turn_rewards", turn_rewards, loss_mask)
        outside = (~keep) & (turn_rewards != 0)
        if outside.any():
            row, col = torch.nonzero(outside, as_tuple=False)[0].tolist()
            raise ValueError(
                f"turn_rewards has a reward at row {row}, token {col}, where the loss mask is 0; put step rewards "
                "on the turn's last sampled token (turn_end_positions)"
            )
        selected = torch.where(keep, turn_rewards.detach().to(dtype), _zero(rewards))
        if not torch.isfinite(selected).all():
            raise ValueError("turn_rewards contain NaN or inf")
        rewards = selected
    else:
        for row, col, value in turn_rewards:
            if not (0 <= row < batch and 0 <= col < width):
                raise ValueError(f"turn reward at (row {row}, token {col}) is outside the [{batch}, {width}] batch")
            if not keep[row, col]:
                raise ValueError(
                    f"turn reward at row {row}, token {col} sits where the loss mask is 0; put step rewards on "
                    "the turn's last sampled token (turn_end_positions)"
                )
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"turn reward at row {row}, token {col} is {value}")
            rewards[row, col] += value

    if kl is not None and kl_coef != 0.0:
        _check_2d("kl", kl, loss_mask)
        penalty = torch.where(keep, kl.detach().to(dtype), _zero(rewards))
        rewards = rewards - kl_coef * penalty
    return rewards


def ppo_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float, whiten: bool = True
) -> tuple[Tensor, Tensor]:
    """GAE advantages, whitened over the selected tokens of the batch, and the value targets.

    token_rewards, values (the critic's values at sampling time), mask: [B, T]. `returns = A + V` comes from the
    raw GAE advantages (before whitening), as in verl, OpenRLHF and TRL's PPO. Whitening uses the mean and
    unbiased variance over all selected tokens of this batch, so call it on the whole rollout batch, not a
    minibatch.
    Returns (advantages [B, T], returns [B, T]): detached, 0 at mask-0 positions.
    """
    advantages, returns = gae(token_rewards, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def whiten_stats(x: Tensor, mask: Tensor) -> tuple[float, float, float]:
    """(count, sum, sum of squares) of `x` over the selected positions, to reduce across processes.

    x, mask: equal shapes. Turn the global sums into `mean = s / n`, `var = (q - n * mean**2) / (n - 1)` (unbiased,
    as `masked_whiten`), then call `whiten`.
    """
    keep = mask.bool()
    x = torch.where(keep, x.detach(), _zero(x)).double()
    return float(keep.sum()), float(x.sum()), float((x * x).sum())


def whiten(x: Tensor, mask: Tensor, *, mean: float, var: float, eps: float = 1e-8) -> Tensor:
    """`(x - mean) / sqrt(var + eps)` on selected positions, 0 elsewhere, with given (e.g. global) statistics."""
    keep = mask.bool()
    return torch.where(keep, (x - mean) / math.sqrt(max(var, 0.0) + eps), _zero(x))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the returns' variance the values explain: `1 - Var(R - V) / Var(R)` over selected tokens.

    values, returns, mask: [B, T] (or any equal shapes). 1 for a perfect critic, 0 for one predicting any constant,
    negative for one worse than a constant. Defined as 0 when the returns have no variance (fewer than two
    selected tokens, or all equal): there is nothing to explain, and a NaN would poison logged averages.
    Returns a detached 0-d tensor.
    """
    if not (values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"values, returns and mask must share a shape; got {tuple(values.shape)}, {tuple(returns.shape)}, "
            f"{tuple(mask.shape)}"
        )
    with torch.no_grad():
        keep = mask.bool()
        values = torch.where(keep, values.detach(), _zero(values))
        returns = torch.where(keep, returns.detach().to(values.dtype), _zero(values))
        return explained_variance_from(masked_var(returns, keep), masked_var(returns - values, keep))


def explained_variance_from(returns_var: Tensor | float, error_var: Tensor | float) -> Tensor | float:
    """`1 - error_var / returns_var`, 0 when `returns_var` is not positive: `explained_variance` from the two
    variances, for statistics reduced elsewhere (e.g. over processes). Tensors in, a tensor out; floats, a float."""
    if isinstance(returns_var, Tensor):
        safe = torch.where(returns_var > 0, returns_var, torch.ones_like(returns_var))
        return torch.where(returns_var > 0, 1 - error_var / safe, torch.zeros_like(returns_var))
    return 1 - error_var / returns_var if returns_var > 0 else 0.0


def combined_loss(policy: Tensor, *, entropy: Tensor | None = None, entropy_coef: float = 0.0,
                  value: Tensor | None = None, vf_coef: float = 0.0) -> Tensor:
    """PPO's objective for one batch: `policy - entropy_coef * entropy + vf_coef * value`.

    policy: the policy loss (`losses.policy_loss`); entropy: the masked mean entropy (`masked_entropy`), a bonus
    only when `entropy_coef` > 0 (else it is a diagnostic and adds nothing, not even a zero times its graph);
    value: the value loss (`value_loss`), None without a critic. All 0-d tensors with the same global
    denominators, so micro-batch results add up to the whole batch's. Returns a 0-d tensor keeping the graphs.
    """
    loss = policy
    if entropy is not None and entropy_coef > 0:
        loss = loss - entropy_coef * entropy
    if value is not None:
        loss = loss + vf_coef * value
    return loss


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    value_clip: float | None,
    num_tokens: Count | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: `0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`, token-averaged.

    values: [B, T] current critic values (differentiable); old_values: [B, T] values at sampling time; returns:
    [B, T] GAE targets (both constants); mask: [B, T]. `value_clip` = c; None turns clipping off (plain 0.5 MSE).
    The per-token losses are summed over selected tokens and divided by `num_tokens`: the whole optimizer step's
    selected-token count (all micro-batches and processes), default this batch's. With the global count,
    micro-batch losses (and gradients) sum to the whole batch's, as with `policy_loss`.

    Returns (loss: 0-d tensor, diagnostics: detached 0-d tensors): `value_loss`, `value_clip_fraction` (tokens
    where the clipped term is the larger, i.e. the gradient is cut), `value_mean`, `explained_variance` (of
    `returns` by `values`, over this batch), `num_tokens` (this batch's selected tokens, to weight the means when
    averaging over micro-batches).
    """
    _check_2d("values", values, mask)
    _check_2d("old_values", old_values, mask)
    _check_2d("returns", returns, mask)
    if value_clip is not None and value_clip < 0:
        raise ValueError(f"value_clip must be >= 0 or None, got {value_clip}")
    keep = mask.bool()
    zero = _zero(values)
    values = torch.where(keep, values, zero)
    old_values = torch.where(keep, old_values.detach().to(values.dtype), zero)
    returns = torch.where(keep, returns.detach().to(values.dtype), zero)

    unclipped = (values - returns) ** 2
    if value_clip is None:
        per_token = unclipped
        clipped_active = torch.zeros_like(keep)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        clipped = (clipped_values - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipped_active = (clipped > unclipped).detach()
    loss = 0.5 * masked_sum(per_token, keep) / _denominator(num_tokens, keep, values.dtype)

    with torch.no_grad():
        diagnostics = {
            "value_loss": loss.detach(),
            "value_clip_fraction": masked_mean(clipped_active.to(values.dtype), keep),
            "value_mean": masked_mean(values.detach(), keep),
            "explained_variance": explained_variance(values, returns, keep),
            "num_tokens": keep.sum().to(values.dtype),
        }
    return loss, diagnostics


def approx_kl(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """Approximate KL(old || current) of the sampled tokens: masked mean of `(ratio - 1) - log(ratio)`.

    The k3 estimator (>= 0, unbiased under the old policy's samples), as logged by verl/OpenRLHF/cleanrl.
    logp, old_logp, mask: [B, T]. Returns a detached 0-d tensor (0 when nothing is selected).
    """
    _check_2d("logp", logp, mask)
    _check_2d("old_logp", old_logp, mask)
    with torch.no_grad():
        keep = mask.bool()
        log_ratio = torch.where(keep, logp.detach() - old_logp.detach().to(logp.dtype), _zero(logp))
        return masked_mean(torch.expm1(log_ratio) - log_ratio, keep)


def masked_entropy(entropy: Tensor, mask: Tensor, *, num_tokens: Count | None = None) -> Tensor:
    """Token-mean entropy over selected tokens, for the entropy bonus (`loss - coef * masked_entropy(...)`).

    entropy: [B, T] per-token entropies (e.g. `entropy_from_logits`; differentiable); mask: [B, T].
    `num_tokens`: global selected-token count (see `value_loss`), default this batch's. Returns a 0-d tensor
    that keeps the graph.
    """
    _check_2d("entropy", entropy, mask)
    keep = mask.bool()
    return masked_sum(entropy, keep) / _denominator(num_tokens, keep, entropy.dtype)


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence-level log importance ratio, broadcast to tokens with a straight-through gradient.

    Value at every selected token of row i: `mean_t (logp - old_logp)` over the row's selected tokens (TRL 1.16's
    `importance_sampling_level="sequence"`). Gradient: GSPO-token's `sg[s_i] * pi_t / sg[pi_t]`, i.e.
    `d log_ratio[i, t] / d logp[i, t] = 1` and 0 across tokens, so a per-token advantage weights its own
    token. With one advantage per sequence this gives the same loss and gradient as TRL's [B, 1] ratio (which
    differentiates through the mean) for every loss_type; the parity test checks it against TRL's trainer.
    logp (differentiable), old_logp (constant), mask: [B, T]. Returns [B, T], 0 at mask-0 positions (ratio 1).
    For `policy_loss`, `old_logp + sequence_log_ratio(...)` in place of `logp` yields the GSPO surrogate.
    """
    _check_2d("logp", logp, mask)
    _check_2d("old_logp", old_logp, mask)
    keep = mask.bool()
    zero = _zero(logp)
    logp = torch.where(keep, logp, zero)
    old_logp = torch.where(keep, old_logp.detach().to(logp.dtype), zero)
    sequence = masked_mean((logp - old_logp).detach(), keep, dim=1).unsqueeze(1)  # [B, 1]
    return torch.where(keep, sequence + (logp - logp.detach()), zero)


def sequence_importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO ratio `exp(mean_t (logp - old_logp))` per sequence, on every selected token (straight-through).

    logp, old_logp, mask: [B, T]. Returns [B, T]; see `sequence_log_ratio` for the gradient. 1 at mask-0
    positions (with zero gradient); the caller masks the loss.
    """
    return torch.exp(sequence_log_ratio(logp, old_logp, mask))
