"""Advantage estimators, registered by name (`advantage_estimator` in the run config).

Outcome estimators take one scalar reward per completion:

    estimator(rewards: Tensor[N], group_size: int, **opts) -> (advantages: Tensor[N], diagnostics: dict[str, float])

with N = num_prompts * group_size and each prompt's completions contiguous (`rewards.view(-1, group_size)` is one
row per prompt). A group whose rewards are all equal carries no signal and gets advantage exactly 0.

- `grpo`: (r - group mean) / (std + eps), std unbiased and eps = 1e-4 as TRL 1.16 (`nanstd` with Bessel's
  correction), with TRL's `scale_rewards` choices: `"group"` divides by each group's std, `"batch"` by the std of
  all N rewards (still centred on each group's mean; PPO Lite), `"none"` only centres. The old bools mean
  `True` = `"group"`, `False` = `"none"` (as TRL reads them).
- `dr_grpo`: r - group mean (Dr. GRPO: no std scaling, which biases toward easy/hard prompts).
- `rloo`: r_i - mean of the other G-1 rewards of its group (leave-one-out baseline); needs G >= 2.
- `reinforce_pp`: REINFORCE++-baseline: r - group mean, then whitened over the whole batch. verl whitens the
  token-broadcast scores (weighting a sequence by its length); this whitens per sequence, so the estimator needs
  no token mask. The result differs from verl's only through that weighting.

Critic estimators take per-token rewards and the critic's values instead (registered with `critic=True`):

    estimator(token_rewards: Tensor[B, T], values: Tensor[B, T], mask: Tensor[B, T], *, gamma, lam)
        -> (advantages: Tensor[B, T], returns: Tensor[B, T])

- `gae`: generalised advantage estimation (PPO); `algorithm: ppo` trains the critic it needs.

`uses_critic(name)` tells the trainer which signature a name has; one registry serves both, so a config names
any of them with the same key and an unknown name lists them all. `advantage_options(name)`: the run-config keys
an estimator takes as keyword options (`grpo`: `scale_rewards`), declared where it is registered.

Rewards must be finite: the reward stage scores failed calls as 0 before they reach here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from runrl_engine.algorithms.masked import masked_whiten
from runrl_engine.registry import Registry
from runrl_engine.errors import ConfigError

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "CRITIC_ESTIMATORS",
    "register_advantage",
    "get_advantage_estimator",
    "uses_critic",
    "advantage_options",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "gae",
]

AdvantageEstimator = Callable[..., tuple[Tensor, dict[str, float]]]

ADVANTAGE_ESTIMATORS = Registry("advantage_estimator", "advantage estimator")
CRITIC_ESTIMATORS: set[str] = set()  # names whose estimator takes per-token rewards and critic values
_OPTIONS: dict[str, tuple[str, ...]] = {}  # name -> run-config keys passed to the estimator as keyword options


def register_advantage(name: str, *, critic: bool = False, options: tuple[str, ...] = ()
                       ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: make `fn` available as `advantage_estimator: <name>` (`critic=True`: the per-token signature;
    `options`: run-config keys the caller passes as keyword arguments of the same name)."""
    register = ADVANTAGE_ESTIMATORS.register(name)

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        register(fn)  # raises for a name taken, before it could be marked as a critic estimator
        if critic:
            CRITIC_ESTIMATORS.add(name)
        _OPTIONS[name] = tuple(options)
        return fn

    return decorator


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as `name`; ConfigError listing the valid names otherwise."""
    return ADVANTAGE_ESTIMATORS.lookup(name)


def uses_critic(name: str) -> bool:
    """Whether `advantage_estimator: <name>` needs a critic's values (ConfigError for an unknown name)."""
    get_advantage_estimator(name)
    return name in CRITIC_ESTIMATORS


def advantage_options(name: str) -> tuple[str, ...]:
    """The run-config keys `advantage_estimator: <name>` takes as keyword options (ConfigError for an unknown name)."""
    get_advantage_estimator(name)
    return _OPTIONS.get(name, ())


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """rewards [N] -> [N / group_size, group_size], after checking the groups are whole."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into whole groups of {group_size} "
            "(expected num_prompts * group_size, groups contiguous)"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.view(-1, group_size)


def _group_std(grouped: Tensor) -> Tensor:
    """Unbiased std per group [P, G] -> [P]; 0 for groups of one (TRL uses zeros there too)."""
    if grouped.shape[1] < 2:
        return torch.zeros(grouped.shape[0], dtype=grouped.dtype, device=grouped.device)
    return grouped.std(dim=1, unbiased=True)


def _diagnostics(rewards: Tensor, grouped: Tensor, advantages: Tensor) -> dict[str, float]:
    group_std = _group_std(grouped)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "group_reward_std_mean": group_std.mean().item(),
        "frac_zero_std_groups": (grouped == grouped[:, :1]).all(dim=1).float().mean().item(),
        "advantage_abs_mean": advantages.abs().mean().item(),
    }


def _centred(grouped: Tensor) -> Tensor:
    # Subtract each group's mean, then pin groups whose rewards are all equal to an exact 0: the mean of equal
    # floats can differ from them in the last bit, and `grpo` would divide that residue by eps.
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    flat = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centred), centred)


@register_advantage("grpo", options=("scale_rewards",))
def grpo_advantages(
    rewards: Tensor, group_size: int, *, scale_rewards: str | bool = "group", eps: float = 1e-4,
    batch_std: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO: `(r - mean_g) / (std + eps)`, std unbiased: the group's (`scale_rewards="group"`, or True), the whole
    batch's (`"batch"`), or none (`"none"`, or False: only centred).

    rewards: [N], N = num_prompts * group_size, groups contiguous. `batch_std`: the batch std to use under
    `"batch"` when `rewards` is one process's share of a larger batch (default: the std of `rewards`). Returns
    advantages [N] and diagnostics.
    """
    mode = {True: "group", False: "none"}[scale_rewards] if isinstance(scale_rewards, bool) else scale_rewards
    if mode not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none' (or a bool), got {scale_rewards!r}")
    grouped = _groups(rewards, group_size)
    advantages = _centred(grouped)
    if mode == "batch":
        if batch_std is None:
            batch_std = rewards.std().item() if rewards.numel() > 1 else 0.0
        scale = torch.full((grouped.shape[0], 1), batch_std + eps, dtype=grouped.dtype, device=grouped.device)
        advantages = advantages / torch.where(scale > 0, scale, torch.ones_like(scale))
    elif mode == "group":
        scale = _group_std(grouped).unsqueeze(1) + eps
        # Flat groups are already exactly 0; a safe divisor keeps them 0 (not 0/0) even with eps = 0.
        advantages = advantages / torch.where(scale > 0, scale, torch.ones_like(scale))
    advantages = advantages.reshape(-1)
    return advantages, _diagnostics(rewards, grouped, advantages)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_size: int) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: `r - mean_g`, no std scaling.

    rewards: [N], N = num_prompts * group_size, groups contiguous. Returns advantages [N] and diagnostics.
    """
    grouped = _groups(rewards, group_size)
    advantages = _centred(grouped).reshape(-1)
    return advantages, _diagnostics(rewards, grouped, advantages)


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> tuple[Tensor, dict[str, float]]:
    """RLOO: `r_i - mean_{j != i} r_j` within each group, which equals `G / (G - 1) * (r_i - mean_g)`.

    rewards: [N], N = num_prompts * group_size, groups contiguous. Returns advantages [N] and diagnostics.
    """
    if group_size < 2:
        raise ConfigError(
            f"the rloo advantage estimator needs at least 2 completions per prompt, got {group_size}",
            where="num_generations",
            fix="set num_generations >= 2, or use advantage_estimator: grpo",
        )
    grouped = _groups(rewards, group_size)
    advantages = (_centred(grouped) * (group_size / (group_size - 1))).reshape(-1)
    return advantages, _diagnostics(rewards, grouped, advantages)


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-8
) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE++-baseline: `r - mean_g`, then whitened over the whole batch (`(a - mean) / sqrt(var + eps)`).

    rewards: [N], N = num_prompts * group_size, groups contiguous. Returns advantages [N] and diagnostics.
    """
    grouped = _groups(rewards, group_size)
    centred = _centred(grouped).reshape(-1)
    advantages = masked_whiten(centred, torch.ones_like(centred, dtype=torch.bool), shift_mean=True, eps=eps)
    return advantages, _diagnostics(rewards, grouped, advantages)


@register_advantage("gae", critic=True)
def gae(rewards_per_token: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the tokens `mask` selects.

    rewards_per_token, values, mask: [B, T]. Positions with mask 0 are skipped, not treated as steps: the value
    and accumulated advantage carry over them, so right padding (and observation tokens between turns) neither
    discount nor bootstrap. After the last selected token of a row the next value is 0 (the episode ends).

        delta_t = r_t + gamma * V_next - V_t;  A_t = delta_t + gamma * lam * A_next;  returns_t = A_t + V_t

    Returns (advantages [B, T], returns [B, T]), both 0 at masked positions and detached from `values`' graph
    (they are regression targets and policy weights, not things to differentiate through).
    """
    if not (rewards_per_token.shape == values.shape == mask.shape) or rewards_per_token.dim() != 2:
        raise ValueError(
            "rewards_per_token, values and mask must all be [B, T]; got "
            f"{tuple(rewards_per_token.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    keep = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    with torch.no_grad():
        rewards_per_token = torch.where(keep, rewards_per_token.to(values.dtype), zero)
        values = torch.where(keep, values, zero)
        next_value = torch.zeros_like(values[:, 0])
        next_advantage = torch.zeros_like(values[:, 0])
        advantages = torch.zeros_like(values)
        for t in reversed(range(values.shape[1])):
            delta = rewards_per_token[:, t] + gamma * next_value - values[:, t]
            advantage = delta + gamma * lam * next_advantage
            here = keep[:, t]
            advantages[:, t] = torch.where(here, advantage, zero)
            next_value = torch.where(here, values[:, t], next_value)
            next_advantage = torch.where(here, advantage, next_advantage)
        returns = torch.where(keep, advantages + values, zero)
    return advantages, returns

