"""Algorithm math as pure functions on tensors: advantages, policy losses, KL, masked reductions, log-probs.

Nothing here knows about configs, models, processes or logging: tensors, masks and scalars in; tensors and
detached diagnostics out. Names used in run configs resolve through two small registries:
`advantage_estimator` -> `ADVANTAGE_ESTIMATORS` (`get_advantage_estimator`, `uses_critic`) and `loss_type` -> `LOSS_TYPES`
(`get_loss_type`, its token weights) and `SURROGATES` (`surrogate_of`, its per-token loss). Imports torch only.
"""

from runrl_engine.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_ESTIMATORS,
    advantage_options,
    gae,
    get_advantage_estimator,
    register_advantage,
    uses_critic,
)
from runrl_engine.algorithms.logprobs import entropy_from_logits, selective_log_softmax
from runrl_engine.algorithms.losses import (
    LOSS_TYPES,
    SURROGATES,
    cispo_surrogate,
    clipped_surrogate,
    entropy_quantile_threshold,
    get_loss_type,
    high_entropy_mask,
    kl_k3,
    mask_truncated,
    policy_loss,
    register_loss_type,
    sapo_surrogate,
    surrogate_of,
    token_weights,
)
from runrl_engine.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten
from runrl_engine.algorithms.ppo import (
    approx_kl,
    combined_loss,
    explained_variance,
    explained_variance_from,
    masked_entropy,
    ppo_advantages,
    sequence_importance_ratio,
    sequence_log_ratio,
    token_level_rewards,
    turn_end_positions,
    value_loss,
)
from runrl_engine.algorithms.sampler_correction import importance_weights, sampler_correction, sampler_log_ratio

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "CRITIC_ESTIMATORS",
    "LOSS_TYPES",
    "SURROGATES",
    "advantage_options",
    "approx_kl",
    "cispo_surrogate",
    "clipped_surrogate",
    "combined_loss",
    "entropy_from_logits",
    "entropy_quantile_threshold",
    "explained_variance",
    "explained_variance_from",
    "gae",
    "get_advantage_estimator",
    "get_loss_type",
    "high_entropy_mask",
    "kl_k3",
    "mask_truncated",
    "masked_entropy",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "ppo_advantages",
    "register_advantage",
    "register_loss_type",
    "importance_weights",
    "sampler_correction",
    "sampler_log_ratio",
    "sapo_surrogate",
    "selective_log_softmax",
    "sequence_importance_ratio",
    "sequence_log_ratio",
    "surrogate_of",
    "token_level_rewards",
    "token_weights",
    "turn_end_positions",
    "uses_critic",
    "value_loss",
]
