"""runrl_engine.algorithms: hand-computed values, masking, clipping and the accumulation invariants.

Expected numbers are worked out by hand in the comments next to them, never by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from runrl_engine.algorithms import (
    ADVANTAGE_ESTIMATORS,
    LOSS_TYPES,
    SURROGATES,
    cispo_surrogate,
    clipped_surrogate,
    entropy_from_logits,
    entropy_quantile_threshold,
    high_entropy_mask,
    mask_truncated,
    sapo_surrogate,
    surrogate_of,
    gae,
    get_advantage_estimator,
    get_loss_type,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    selective_log_softmax,
    token_weights,
)
from runrl_engine.errors import ConfigError

LOSS_NAMES = ["grpo", "dr_grpo", "dapo", "bnpo"]
ALL_LOSS_NAMES = [*LOSS_NAMES, "cispo", "sapo"]


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- registries


def test_registries_hold_the_documented_names():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"}
    assert set(LOSS_TYPES) == {"grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"}
    assert set(SURROGATES) == {"clip", "cispo", "sapo"}
    assert {name: surrogate_of(name) for name in LOSS_TYPES} == {
        "grpo": "clip", "dr_grpo": "clip", "dapo": "clip", "bnpo": "clip", "cispo": "cispo", "sapo": "sapo"}
    # TRL 1.16 aggregates cispo as dapo and sapo as grpo
    assert get_loss_type("cispo") is get_loss_type("dapo") and get_loss_type("sapo") is get_loss_type("grpo")


def test_unknown_names_fail_listing_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        get_advantage_estimator("gspo")
    assert err.value.where == "advantage_estimator"
    for name in ("dr_grpo", "grpo", "reinforce_pp", "rloo"):
        assert name in err.value.message
    with pytest.raises(ConfigError) as err:
        get_loss_type("ppo")
    assert err.value.where == "loss_type"
    for name in LOSS_NAMES:
        assert name in err.value.message
    with pytest.raises(ConfigError):
        token_weights(torch.ones(1, 2), "vespo")
    with pytest.raises(ConfigError):
        surrogate_of("vespo")


def test_a_name_cannot_be_registered_twice():
    from runrl_engine.algorithms import register_advantage, register_loss_type, uses_critic

    with pytest.raises(ValueError, match="advantage estimator 'rloo' is already registered"):
        register_advantage("rloo", critic=True)(lambda rewards, group_size: None)
    with pytest.raises(ValueError, match="loss_type 'dapo' is already registered"):
        register_loss_type("dapo")(lambda mask, **_: mask)
    assert get_advantage_estimator("rloo").__name__ == "rloo_advantages" and not uses_critic("rloo")


# ----------------------------------------------------------------------------------------------- advantages

# Three prompts, G = 4. Group 1: mean 0.25, deviations (0.75, -0.25, -0.25, -0.25), unbiased var = 0.75 / 3 = 0.25,
# std 0.5. Group 2: mean 2, deviations (1, -1, 1, -1), unbiased var = 4 / 3, std = 2 / sqrt(3). Group 3: all equal.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 3.0, 1.0, 5.0, 5.0, 5.0, 5.0])
CENTRED = [0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]


def test_grpo_divides_by_unbiased_group_std_plus_eps():
    adv, diag = get_advantage_estimator("grpo")(REWARDS, 4)
    g1 = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001]  # eps = 1e-4, as TRL
    s2 = 2 / math.sqrt(3) + 1e-4
    g2 = [1 / s2, -1 / s2, 1 / s2, -1 / s2]
    close(adv, g1 + g2 + [0.0] * 4)
    assert diag["frac_zero_std_groups"] == pytest.approx(1 / 3)
    assert diag["reward_mean"] == pytest.approx(29 / 12)  # (1 + 8 + 20) / 12

    adv, _ = get_advantage_estimator("grpo")(REWARDS, 4, eps=0.0)
    h = math.sqrt(3) / 2
    close(adv, [1.5, -0.5, -0.5, -0.5, h, -h, h, -h, 0.0, 0.0, 0.0, 0.0])


def test_grpo_without_scaling_and_dr_grpo_only_centre():
    adv, _ = get_advantage_estimator("grpo")(REWARDS, 4, scale_rewards=False)
    close(adv, CENTRED)
    adv, _ = get_advantage_estimator("dr_grpo")(REWARDS, 4)
    close(adv, CENTRED)


def test_rloo_subtracts_the_mean_of_the_others():
    adv, _ = get_advantage_estimator("rloo")(REWARDS, 4)
    # r=1 vs others (0,0,0) -> 1; r=0 vs (1,0,0) -> -1/3; r=3 vs (1,3,1) -> 4/3; r=1 vs (3,3,1) -> -4/3.
    t = 1 / 3
    close(adv, [1.0, -t, -t, -t, 4 * t, -4 * t, 4 * t, -4 * t, 0.0, 0.0, 0.0, 0.0])


def test_reinforce_pp_whitens_group_centred_rewards_over_the_batch():
    adv, _ = get_advantage_estimator("reinforce_pp")(REWARDS, 4)
    # Centred values have mean 0 and sum of squares 0.75 + 4 = 4.75; unbiased var over 12 = 4.75 / 11.
    scale = math.sqrt(11 / 4.75)
    close(adv, [c * scale for c in CENTRED], atol=1e-5)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_all_equal_groups_give_exact_zeros(name):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])  # 0.1 * 3 / 3 != 0.1 in floating point
    adv, diag = get_advantage_estimator(name)(rewards, 3)
    assert torch.equal(adv, torch.zeros(6))
    assert diag["frac_zero_std_groups"] == 1.0


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_groups_must_be_whole(name):
    with pytest.raises(ValueError, match="whole groups of 5"):
        get_advantage_estimator(name)(REWARDS, 5)
    with pytest.raises(ValueError, match="1-D"):
        get_advantage_estimator(name)(REWARDS.view(3, 4), 4)


def test_rloo_needs_two_per_group_and_rewards_must_be_finite():
    with pytest.raises(ConfigError, match="at least 2"):
        get_advantage_estimator("rloo")(REWARDS, 1)
    with pytest.raises(ValueError, match="NaN"):
        get_advantage_estimator("grpo")(torch.tensor([1.0, float("nan")]), 2)


# ----------------------------------------------------------------------------------------------------- GAE

# One row, gamma 0.9, lam 0.8 (gamma * lam = 0.72), rewards (0, 0, 0, 1), values (0.5, 0.6, 0.7, 0.8):
#   t=3: delta = 1 - 0.8 = 0.2                                  A = 0.2
#   t=2: delta = 0.9 * 0.8 - 0.7 = 0.02;   A = 0.02 + 0.72 * 0.2     = 0.164
#   t=1: delta = 0.9 * 0.7 - 0.6 = 0.03;   A = 0.03 + 0.72 * 0.164   = 0.14808
#   t=0: delta = 0.9 * 0.6 - 0.5 = 0.04;   A = 0.04 + 0.72 * 0.14808 = 0.1466176
GAE_ADV = [0.1466176, 0.14808, 0.164, 0.2]
GAE_RET = [0.6466176, 0.74808, 0.864, 1.0]


def test_gae_by_hand():
    rewards, values = torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7, 0.8]])
    adv, ret = gae(rewards, values, torch.ones(1, 4), 0.9, 0.8)
    close(adv, [GAE_ADV])
    close(ret, [GAE_RET])


def test_gae_with_right_padding_and_skipped_tokens():
    inf = float("inf")
    rewards = torch.tensor(
        [[0.0, 0.0, 0.0, 1.0, 5.0, 5.0], [0.0, 1.0, 7.0, 7.0, 7.0, 7.0], [0.0, 9.0, 0.0, 1.0, 0.0, 0.0]]
    )
    values = torch.tensor(
        [[0.5, 0.6, 0.7, 0.8, 100.0, inf], [0.5, 0.8, -3.0, inf, 2.0, 2.0], [0.6, 9.0, 0.7, 0.8, 1.0, 1.0]]
    )
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    # Row 2 (length 2): t=1: A = 1 - 0.8 = 0.2; t=0: delta = 0.9 * 0.8 - 0.5 = 0.22, A = 0.22 + 0.72 * 0.2 = 0.364.
    # Row 3 skips its masked token 1, so it is the last three steps of the 1x4 example.
    close(adv[0], GAE_ADV + [0.0, 0.0])
    close(ret[0], GAE_RET + [0.0, 0.0])
    close(adv[1], [0.364, 0.2, 0.0, 0.0, 0.0, 0.0])
    close(ret[1], [0.864, 1.0, 0.0, 0.0, 0.0, 0.0])
    close(adv[2], [0.14808, 0.0, 0.164, 0.2, 0.0, 0.0])


# ------------------------------------------------------------------------------------------------ masked ops


def test_masked_reductions_by_hand_and_ignore_garbage():
    x = torch.tensor([1.0, 2.0, 3.0, float("inf")], requires_grad=True)
    mask = torch.tensor([1, 1, 1, 0])
    close(masked_sum(x, mask), 6.0)
    close(masked_mean(x, mask), 2.0)
    close(masked_var(x, mask), 1.0)  # (1 + 0 + 1) / (3 - 1)
    close(masked_var(x, mask, unbiased=False), 2 / 3)
    close(masked_whiten(x, mask, eps=0.0), [-1.0, 0.0, 1.0, 0.0])
    close(masked_whiten(x, mask, shift_mean=False, eps=0.0), [1.0, 2.0, 3.0, 0.0])
    masked_mean(x, mask).backward()
    assert torch.equal(x.grad, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


def test_masked_mean_along_a_dim_and_of_nothing():
    x = torch.tensor([[1.0, 3.0, 9.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(masked_mean(x, mask, dim=1), [2.0, 0.0])
    close(masked_sum(x, mask, dim=0), [1.0, 3.0, 0.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


# ----------------------------------------------------------------------------------------------- losses, 2x3

# mask (1, 1, 0 / 1, 1, 1): lengths 2 and 3, N = 2 sequences, M = 5 tokens. Advantages (1, -2).
# Ratios inside the clip range [0.8, 1.2], so per-token loss = -ratio * A:
#   row 0 (A = 1):  ratios 1.1, 0.9        -> -1.1, -0.9           sum -2.0, mean -1.0
#   row 1 (A = -2): ratios 1.0, 1.05, 0.85 -> 2.0, 2.1, 1.7        sum  5.8, mean 1.9333...
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -2.0])
RATIOS = torch.tensor([[1.1, 0.9, 1.0], [1.0, 1.05, 0.85]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])
HAND_LOSS = {
    "grpo": (-1.0 + 5.8 / 3) / 2,  # mean over sequences of per-sequence means = 0.4666...
    "bnpo": 3.8 / 5,  # token mean
    "dapo": 3.8 / 5,
    "dr_grpo": 3.8 / (2 * 4),  # sum / (N * max_completion_length=4)
}


def _logp():
    return (OLD + RATIOS.log()).requires_grad_(True)


@pytest.mark.parametrize("loss_type", LOSS_NAMES)
def test_each_loss_type_by_hand(loss_type):
    loss, diag = policy_loss(
        _logp(), OLD, ADV, MASK, loss_type=loss_type, epsilon_low=0.2, max_completion_length=4
    )
    close(loss, HAND_LOSS[loss_type])
    close(diag["pg_loss"], HAND_LOSS[loss_type])
    close(diag["clip_ratio/region_mean"], 0.0)
    close(diag["ratio_mean"], (1.1 + 0.9 + 1.0 + 1.05 + 0.85) / 5)
    close(diag["ratio_max"], 1.1)
    assert "kl" not in diag and not diag["pg_loss"].requires_grad


def test_global_denominators_by_hand():
    # Same batch, but the step holds 4 sequences / 10 tokens in all: every weight halves.
    kw = dict(epsilon_low=0.2, num_sequences=4, num_tokens=10, max_completion_length=4)
    close(policy_loss(_logp(), OLD, ADV, MASK, loss_type="grpo", **kw)[0], (-1.0 + 5.8 / 3) / 4)
    close(policy_loss(_logp(), OLD, ADV, MASK, loss_type="dapo", **kw)[0], 3.8 / 10)
    close(policy_loss(_logp(), OLD, ADV, MASK, loss_type="dr_grpo", **kw)[0], 3.8 / 16)
    nt = torch.tensor(10.0)  # an all-reduced count arrives as a tensor
    close(policy_loss(_logp(), OLD, ADV, MASK, loss_type="bnpo", epsilon_low=0.2, num_tokens=nt)[0], 3.8 / 10)


def test_token_weights_by_hand():
    close(token_weights(MASK, "grpo"), [[1 / 4, 1 / 4, 0.0], [1 / 6, 1 / 6, 1 / 6]])
    close(token_weights(MASK, "bnpo"), [[0.2, 0.2, 0.0], [0.2, 0.2, 0.2]])
    close(token_weights(MASK, "dr_grpo", max_completion_length=5), [[0.1, 0.1, 0.0], [0.1, 0.1, 0.1]])
    with pytest.raises(ValueError, match="max_completion_length"):
        token_weights(MASK, "dr_grpo")


def test_kl_penalty_by_hand():
    # ref - logp = ln 2 on token (1, 2), 0 elsewhere: k3 = 2 - ln 2 - 1 = 0.3068528 there, 0 elsewhere.
    # That token has ratio 0.85, A = -2, weight 1/5 (bnpo): its surrogate gradient is 0.2 * 0.85 * 2 = 0.34.
    k3, r = 1 - math.log(2), 0.85
    logp = _logp()
    ref = logp.detach().clone()
    ref[1, 2] += math.log(2)
    close(kl_k3(logp.detach(), ref)[1], [0.0, 0.0, k3])
    kw = dict(loss_type="bnpo", epsilon_low=0.2, beta=0.04, ref_logp=ref)

    # Plain k3: d/dlogp = 1 - exp(ref - logp) = -1, times beta * weight = 0.04 * 0.2.
    loss, diag = policy_loss(logp, OLD, ADV, MASK, kl_bias_correction=False, **kw)
    close(loss, 3.8 / 5 + 0.04 * k3 / 5)
    close(diag["kl"], k3 / 5)
    close(diag["pg_loss"], 3.8 / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad[1, 2], 0.34 - 0.04 * 0.2)

    # TRL's default correction: the penalty is k3 * ratio, whose derivative is r * (k3 + 1 - 2) = -r * ln 2.
    loss, diag = policy_loss(logp, OLD, ADV, MASK, **kw)
    close(loss, 3.8 / 5 + 0.04 * k3 * r / 5)
    close(diag["kl"], k3 * r / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad[1, 2], 0.34 - 0.04 * 0.2 * r * math.log(2))


def test_beta_needs_ref_logp():
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(_logp(), OLD, ADV, MASK, loss_type="grpo", epsilon_low=0.2, beta=0.1)


# --------------------------------------------------------------------------------------------------- clipping


def test_clipping_stops_the_gradient_in_the_right_direction():
    # One token per row; epsilon_low 0.2, epsilon_high 0.28 -> the ratio may move within [0.8, 1.28].
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.25, 1.25])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    logp = ratios.log().unsqueeze(1).requires_grad_(True)
    loss, diag = clipped_surrogate(logp, torch.zeros(6, 1), adv, epsilon_low=0.2, epsilon_high=0.28)
    # A>0, r=1.5 > 1.28: clipped at 1.28 -> loss -1.28, no gradient (no further push up).
    # A>0, r=0.5: min(0.5, 0.8) = 0.5, unclipped -> gradient -r*A = -0.5 (the pessimistic branch keeps it).
    # A<0, r=0.5 < 0.8: min(-0.5, -0.8) = -0.8 clipped -> loss 0.8, no gradient (no further push down).
    # A<0, r=1.5: min(-1.5, -1.28) = -1.5, unclipped -> loss 1.5, gradient 1.5.
    # r=1.25 is inside [0.8, 1.28]: unclipped either sign.
    close(loss[:, 0], [-1.28, -0.5, 0.8, 1.5, -1.25, 1.25])
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    close(grad[:, 0], [0.0, -0.5, 0.0, 1.5, -1.25, 1.25])
    close(diag["clip_ratio/high_mean"], 1 / 6)
    close(diag["clip_ratio/low_mean"], 1 / 6)
    close(diag["clip_ratio/region_mean"], 2 / 6)

    # Symmetric epsilon (epsilon_high defaults to epsilon_low): r = 1.25 > 1.2 is now clipped for A > 0.
    loss, diag = clipped_surrogate(logp, torch.zeros(6, 1), adv, epsilon_low=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    close(grad[4:, 0], [0.0, 1.25])
    close(diag["clip_ratio/high_mean"], 2 / 6)


def test_clip_diagnostics_only_count_selected_tokens():
    logp = torch.tensor([[math.log(1.5), math.log(1.5)]])
    mask = torch.tensor([[1, 0]])
    _, diag = clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]), epsilon_low=0.2, mask=mask)
    close(diag["clip_ratio/high_mean"], 1.0)
    close(diag["ratio_mean"], 1.5)


def test_delta_bounds_the_unclipped_branch_for_negative_advantages():
    # epsilon 0.2 / 0.28, delta 1.4. Per token: -min(min(r, 1.4) * A, clip(r, 0.8, 1.28) * A).
    ratios = torch.tensor([1.5, 2.0, 1.3, 1.5])
    adv = torch.tensor([-1.0, -1.0, -1.0, 1.0])
    logp = ratios.log().unsqueeze(1).requires_grad_(True)
    loss, diag = clipped_surrogate(logp, torch.zeros(4, 1), adv, epsilon_low=0.2, epsilon_high=0.28, delta=1.4)
    # A<0, r=1.5: min(-1.4, -1.28) = -1.4 -> loss 1.4 (not 1.5), no gradient (r is above delta).
    # A<0, r=2.0: likewise 1.4 (not 2.0), no gradient.
    # A<0, r=1.3 < delta: min(-1.3, -1.28) = -1.3 -> loss 1.3, gradient r = 1.3, as without delta.
    # A>0, r=1.5: min(1.4, 1.28) = 1.28 -> loss -1.28, no gradient: delta changes nothing for A > 0.
    close(loss[:, 0], [1.4, 1.4, 1.3, -1.28])
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    close(grad[:, 0], [0.0, 0.0, 1.3, 0.0])
    close(diag["clip_ratio/delta_mean"], 2 / 4)
    close(diag["ratio_max"], 2.0)  # the ratio's own statistics are of the unbounded ratio
    plain, plain_diag = clipped_surrogate(logp, torch.zeros(4, 1), adv, epsilon_low=0.2, epsilon_high=0.28)
    close(plain[:, 0], [1.5, 2.0, 1.3, -1.28])
    assert "clip_ratio/delta_mean" not in plain_diag
    with pytest.raises(ValueError, match="delta must be > 1 \\+ epsilon_high"):
        clipped_surrogate(logp, torch.zeros(4, 1), adv, epsilon_low=0.2, epsilon_high=0.28, delta=1.28)


def test_policy_loss_passes_delta_to_the_clip():
    # Token (1, 0) of the 2x3 batch: A = -2, ratio 3 (> delta 1.5): its loss is 2 * 1.5 = 3 instead of 2 * 3 = 6.
    logp = _logp().detach().clone()
    logp[1, 0] = OLD[1, 0] + math.log(3.0)
    kw = dict(loss_type="bnpo", epsilon_low=0.2)
    plain = policy_loss(logp, OLD, ADV, MASK, **kw)[0]
    bounded, diag = policy_loss(logp, OLD, ADV, MASK, delta=1.5, **kw)
    close(plain, (3.8 - 2.0 + 6.0) / 5)
    close(bounded, (3.8 - 2.0 + 3.0) / 5)
    close(diag["clip_ratio/delta_mean"], 1 / 5)


# CISPO on the 2x3 batch, epsilon_max 1.08: weights min(r, 1.08) = (1.08, 0.9 / 1.0, 1.05, 0.85), detached;
# per-token loss -w * A * logp with logp = OLD + ln(ratio); dapo's weights (1/5 each).
CISPO_W = torch.tensor([[1.08, 0.9, 0.0], [1.0, 1.05, 0.85]])
CISPO_HAND = (-1.08 * (-1.0 + math.log(1.1)) - 0.9 * (-2.0 + math.log(0.9))
              + 2 * 1.0 * -0.3 + 2 * 1.05 * (-1.5 + math.log(1.05)) + 2 * 0.85 * (-2.5 + math.log(0.85))) / 5


def test_cispo_by_hand():
    logp = _logp()
    loss, diag = policy_loss(logp, OLD, ADV, MASK, loss_type="cispo", epsilon_low=0.2, epsilon_high=1.08)
    close(loss, CISPO_HAND)
    # d/dlogp = -w * A / 5: the capped token (0, 0) keeps the gradient -1.08 / 5 (the clip would give it 0)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, -CISPO_W * torch.tensor([[1.0], [-2.0]]) / 5)
    close(diag["cispo_clip_ratio"], 1 / 5)  # (0, 0): ratio 1.1 > 1.08 with A > 0
    close(diag["clip_ratio/region_mean"], 1 / 5)
    close(diag["ratio_max"], 1.1)
    # the surrogate alone, with a negative advantage capped too: counted in region_mean only
    per_token, d = cispo_surrogate(torch.tensor([[math.log(2.0)]]), torch.zeros(1, 1), torch.tensor([-1.0]),
                                   epsilon_max=1.5)
    close(per_token, [[1.5 * math.log(2.0)]])
    close(d["cispo_clip_ratio"], 0.0)
    close(d["clip_ratio/region_mean"], 1.0)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_sapo_by_hand():
    # Per token -sigmoid(tau (r - 1)) * 4 / tau * A; tau = 1 for A > 0 (row 0), 1.05 otherwise (row 1); grpo's
    # weights. Row 0: -4 (sigmoid(0.1) + sigmoid(-0.1)) = -4 over 2 tokens -> mean -2.
    # Row 1 (A = -2): 8 / 1.05 * (sigmoid(0) + sigmoid(0.0525) + sigmoid(-0.1575)) over 3 tokens.
    row1 = 8 / 1.05 * (_sigmoid(0.0) + _sigmoid(1.05 * 0.05) + _sigmoid(-1.05 * 0.15)) / 3
    logp = _logp()
    loss, diag = policy_loss(logp, OLD, ADV, MASK, loss_type="sapo", epsilon_low=0.2)
    close(loss, (-2.0 + row1) / 2)
    # d/dlogp = -4 s (1 - s) * r * A * weight; token (1, 0): r = 1, s = 1/2 -> -1 * (-2) / 6 = 1/3
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad[1, 0], 1 / 3)
    s = _sigmoid(0.1)
    close(grad[0, 0], -4 * s * (1 - s) * 1.1 / 4)
    gates = [4 * _sigmoid(x) * (1 - _sigmoid(x)) for x in (0.1, -0.1, 0.0, 1.05 * 0.05, -1.05 * 0.15)]
    close(diag["sapo/gate_mean"], sum(gates) / 5)
    # the temperatures: A > 0 uses temperature_pos, A <= 0 temperature_neg (TRL: "non-positive")
    one = torch.tensor([[math.log(1.5)]] * 2)
    per_token, _ = sapo_surrogate(one, torch.zeros(2, 1), torch.tensor([1.0, 0.0]), temperature_pos=2.0,
                                  temperature_neg=3.0)
    close(per_token[:, 0], [-_sigmoid(2.0 * 0.5) * 2.0, 0.0])


def test_entropy_quantile_threshold_and_mask_by_hand():
    ent = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # 5.0 sits on padding: never counted, never kept
    # selected, sorted: 0.1 0.3 0.5 0.7 0.9. Top 40%: the 0.6 quantile, position 0.6 * 4 = 2.4 -> 0.5 + 0.4 * 0.2
    close(entropy_quantile_threshold(ent[mask.bool()], 0.6), 0.58)
    keep = high_entropy_mask(ent, mask, 0.4)
    assert keep.tolist() == [[False, False, True], [False, True, False]]
    assert high_entropy_mask(ent, mask, 1.0).tolist() == mask.bool().tolist()  # quantile 0 = the minimum
    assert high_entropy_mask(ent, mask, 0.0).tolist() == [[False, False, True], [False, False, False]]
    assert not high_entropy_mask(ent, torch.zeros_like(mask), 0.5).any()  # nothing selected: nothing kept
    # a threshold from elsewhere (the trainer's, over the whole step) is used as given
    assert high_entropy_mask(ent, mask, 0.4, threshold=0.3).tolist() == [[False, True, True], [True, True, False]]
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        close(entropy_quantile_threshold(values, q), float(torch.quantile(values, q)))
    assert torch.isnan(entropy_quantile_threshold(torch.zeros(0), 0.5))


def test_token_mask_drops_the_surrogate_but_keeps_weights_and_kl():
    # token (1, 2) (A = -2, r = 0.85, loss 1.7) outside the token mask: bnpo's denominator is still 5 tokens
    token_mask = MASK.bool().clone()
    token_mask[1, 2] = False
    logp = _logp()
    loss, diag = policy_loss(logp, OLD, ADV, MASK, loss_type="bnpo", epsilon_low=0.2, token_mask=token_mask)
    close(loss, (3.8 - 1.7) / 5)
    close(diag["ratio_mean"], (1.1 + 0.9 + 1.0 + 1.05 + 0.85) / 5)  # diagnostics over `mask`
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad[1, 2], 0.0)
    grpo = policy_loss(_logp(), OLD, ADV, MASK, loss_type="grpo", epsilon_low=0.2, token_mask=token_mask)[0]
    close(grpo, (-1.0 + (2.0 + 2.1) / 3) / 2)  # row 1 still divided by its 3 tokens
    # the KL term stays on every token: plain k3's gradient at (1, 2) with ref - logp = ln 2 is -1 * 0.04 / 5
    ref = logp.detach().clone()
    ref[1, 2] += math.log(2)
    loss, _ = policy_loss(logp, OLD, ADV, MASK, loss_type="bnpo", epsilon_low=0.2, beta=0.04, ref_logp=ref,
                          kl_bias_correction=False, token_mask=token_mask)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad[1, 2], -0.04 / 5)


@pytest.mark.parametrize("loss_type", ALL_LOSS_NAMES)
def test_mask_truncated_by_hand_and_an_all_truncated_step_is_zero(loss_type):
    masked = mask_truncated(MASK.float(), torch.tensor([False, True]))
    assert masked.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    kw = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=1.08, max_completion_length=4)
    # only row 0 left: bnpo/dapo/cispo divide by its 2 tokens; grpo/sapo still count 2 sequences (as TRL)
    assert policy_loss(_logp(), OLD, ADV, masked, **kw)[1]["num_tokens"] == 2
    nothing = mask_truncated(MASK.float(), torch.tensor([True, True]))
    logp = _logp()
    loss, diag = policy_loss(logp, OLD, ADV, nothing, num_tokens=0, **kw)
    (grad,) = torch.autograd.grad(loss, logp, allow_unused=True)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert grad is None or torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in diag.values())
    with pytest.raises(ValueError, match="truncated must be"):
        mask_truncated(MASK.float(), torch.tensor([True]))



# ------------------------------------------------------------------------------------- masked tokens are inert


def _random_batch(seed=0, batch=8, width=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5, 3, 1])[:batch]
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    old = -torch.rand(batch, width, generator=g) * 3
    logp = old + (torch.rand(batch, width, generator=g) - 0.5) * 0.8  # ratios in [0.67, 1.5]: some clipped
    ref = old + (torch.rand(batch, width, generator=g) - 0.5) * 0.5
    adv = torch.randn(batch, generator=g)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("garbage", [1e4, float("inf"), float("nan")])
@pytest.mark.parametrize("loss_type", ALL_LOSS_NAMES)
def test_garbage_at_masked_positions_changes_nothing(loss_type, garbage):
    logp, old, ref, adv, mask = _random_batch()
    kw = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=0.04, max_completion_length=5)

    clean = logp.clone().requires_grad_(True)
    loss, diag = policy_loss(clean, old, adv, mask, ref_logp=ref, **kw)
    loss.backward()

    pad = mask == 0
    dirty = logp.masked_fill(pad, garbage).requires_grad_(True)  # exp(1e4 - old) alone would be inf
    dirty_old = old.masked_fill(pad, -garbage)
    dirty_ref = ref.masked_fill(pad, garbage)
    dirty_loss, dirty_diag = policy_loss(dirty, dirty_old, adv, mask, ref_logp=dirty_ref, **kw)
    dirty_loss.backward()

    assert torch.isfinite(dirty_loss)
    assert torch.equal(dirty_loss, loss)
    assert torch.equal(dirty.grad, clean.grad)
    assert torch.equal(dirty.grad[pad], torch.zeros(int(pad.sum())))
    assert (clean.grad[~pad] != 0).any()
    for key, value in diag.items():
        assert torch.equal(dirty_diag[key], value), key


# ------------------------------------------------------------------------------------------------- invariants


def _param_logp(theta, logp, mask):
    """logp as a function of a shared 'model parameter' theta [T], so gradients can be compared across splits."""
    return logp + theta * mask


def _loss_and_grad(parts, loss_type, totals, world_size=1):
    """Sum of per-micro-batch losses and d/dtheta, as the trainer computes them with global denominators."""
    theta = torch.zeros(5, requires_grad=True)
    total = 0.0
    for logp, old, ref, adv, mask in parts:
        loss, _ = policy_loss(
            _param_logp(theta, logp, mask), old, adv, mask, loss_type=loss_type, epsilon_low=0.2,
            epsilon_high=0.28, beta=0.04, ref_logp=ref, max_completion_length=5, **totals,
        )
        total = total + loss
    (grad,) = torch.autograd.grad(total, theta)
    return total.detach(), grad


def _split(batch, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(tuple(t[start : start + size] for t in batch))
        start += size
    return out


@pytest.mark.parametrize("loss_type", ALL_LOSS_NAMES)
@pytest.mark.parametrize("sizes", [[8], [1] * 8, [4, 4], [2, 2, 2, 2], [3, 5]])
def test_micro_batch_split_gives_the_whole_batch_loss_and_gradient(loss_type, sizes):
    batch = _random_batch()
    totals = dict(num_sequences=8, num_tokens=int(batch[4].sum()))
    whole_loss, whole_grad = _loss_and_grad([batch], loss_type, {})  # local counts == global counts here
    loss, grad = _loss_and_grad(_split(batch, sizes), loss_type, totals)
    close(loss, whole_loss.item())
    torch.testing.assert_close(grad, whole_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ALL_LOSS_NAMES)
def test_data_parallel_processes_sum_to_the_single_process_loss(loss_type):
    batch = _random_batch()
    totals = dict(num_sequences=8, num_tokens=int(batch[4].sum()))
    whole_loss, whole_grad = _loss_and_grad([batch], loss_type, {})
    # Two processes, each with two micro-batches of two sequences.
    shards = [_split(batch, [2, 2]), _split(tuple(t[4:] for t in batch), [2, 2])]
    per_process = [_loss_and_grad(parts, loss_type, totals) for parts in shards]
    close(sum(loss for loss, _ in per_process), whole_loss.item())
    # DDP averages gradients, so the trainer scales each local loss by world_size (2).
    ddp_grad = torch.stack([2 * grad for _, grad in per_process]).mean(0)
    torch.testing.assert_close(ddp_grad, whole_grad, atol=1e-6, rtol=1e-5)


def test_local_counts_would_break_the_split_invariant():
    # The same split with local denominators is a different loss: the global counts above are doing the work.
    batch = _random_batch()
    whole_loss, _ = _loss_and_grad([batch], "dapo", {})
    local_loss, _ = _loss_and_grad(_split(batch, [4, 4]), "dapo", {})
    assert abs(local_loss.item() - whole_loss.item()) > 1e-3


# ------------------------------------------------------------------------------------------------- log-probs


def _logits(dtype=torch.float32, shape=(3, 7, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g) * 4).to(dtype).requires_grad_(True)
    index = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits, index


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 100])
def test_selective_log_softmax_matches_log_softmax_gather_fp32(chunk_size):
    logits, index = _logits()
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index, chunk_size=chunk_size)
    assert got.shape == (3, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    upstream = torch.randn(3, 7)
    (g_expected,) = torch.autograd.grad((expected * upstream).sum(), logits)
    (g_got,) = torch.autograd.grad((got * upstream).sum(), logits)
    torch.testing.assert_close(g_got, g_expected, atol=1e-6, rtol=1e-5)


def test_selective_log_softmax_on_a_strided_view_and_with_temperature():
    logits, index = _logits(shape=(2, 6, 30))
    view = logits[:, :-1]  # the usual shifted slice: not viewable as [rows, V]
    expected = torch.log_softmax(view / 0.7, -1).gather(-1, index[:, :-1].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(
        selective_log_softmax(view, index[:, :-1], temperature=0.7, chunk_size=2), expected, atol=1e-5, rtol=1e-6
    )
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(logits, index[:, :-1])


def test_selective_log_softmax_bf16_is_close_and_returns_fp32():
    logits, index = _logits(torch.bfloat16)
    got = selective_log_softmax(logits, index, chunk_size=5)
    assert got.dtype == torch.float32
    # Exact against fp32 math on the same (bf16-rounded) logits; the naive bf16 path is only roughly equal.
    exact = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-6)
    naive = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
    torch.testing.assert_close(got, naive, atol=0.1, rtol=0.02)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    (g_exact,) = torch.autograd.grad(exact.sum(), logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, g_exact)


def test_entropy_from_logits():
    logits, _ = _logits()
    p = torch.softmax(logits, -1)
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), expected, atol=1e-5, rtol=1e-5)
    uniform = torch.zeros(2, 8)
    close(entropy_from_logits(uniform), [math.log(8)] * 2)
