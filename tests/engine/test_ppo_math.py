"""runrl_engine.algorithms.ppo: per-token rewards, GAE advantages, the clipped value loss, PPO diagnostics, GSPO.

Expected numbers are worked out by hand in the comments next to them, never by calling the code under test. The
GSPO loss is also compared against TRL 1.16's own GRPOTrainer (test_trl_parity.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from runrl_engine.algorithms import (
    ADVANTAGE_ESTIMATORS,
    approx_kl,
    explained_variance,
    masked_entropy,
    policy_loss,
    ppo_advantages,
    sequence_importance_ratio,
    sequence_log_ratio,
    token_level_rewards,
    turn_end_positions,
    value_loss,
)

NAN, INF = float("nan"), float("inf")


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.tensor(expected).double(), atol=atol, rtol=0)


# ---------------------------------------------------------------- token_level_rewards / turn_end_positions


def test_sequence_reward_lands_on_the_last_sampled_token_of_a_padded_batch():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    rewards = token_level_rewards(torch.tensor([1.5, -2.0, 3.0, 7.0]), mask)
    expected = [
        [0.0, 0.0, 1.5, 0.0, 0.0],  # last sampled token at 2; padding after it gets nothing
        [0.0, 0.0, 0.0, 0.0, -2.0],
        [3.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],  # no sampled token: nowhere to put the reward
    ]
    _close(rewards, expected)
    assert rewards.dtype == torch.float32


def test_turn_end_positions_are_the_last_token_of_each_run_of_ones():
    mask = torch.tensor(
        [
            [0, 1, 1, 0, 0, 1, 0, 1, 1],  # prompt, turn 1 (1-2), observation (3-4), turn 2 (5), obs, turn 3 (7-8)
            [1, 1, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    assert turn_end_positions(mask) == [[2, 5, 8], [3], []]


def test_turn_rewards_land_at_each_turn_end_and_never_on_observation_tokens():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 0, 0, 0, 0]])
    triples = [(0, 1, 0.5), (0, 6, 2.0), (1, 0, -1.0), (1, 2, 0.25), (1, 2, 0.25)]  # same position: they add
    expected = [
        [0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0],
        [-1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
    rewards = token_level_rewards(None, mask, turn_rewards=triples)
    _close(rewards, expected)
    assert (rewards[mask == 0] == 0).all()
    # The same rewards as a [B, T] tensor.
    _close(token_level_rewards(None, mask, turn_rewards=torch.tensor(expected)), expected)


def test_turn_rewards_on_mask_zero_tokens_or_with_a_sequence_reward_raise():
    mask = torch.tensor([[1, 1, 0, 1]])
    with pytest.raises(ValueError, match="loss mask is 0"):
        token_level_rewards(None, mask, turn_rewards=[(0, 2, 1.0)])
    with pytest.raises(ValueError, match="loss mask is 0"):
        token_level_rewards(None, mask, turn_rewards=torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="outside"):
        token_level_rewards(None, mask, turn_rewards=[(1, 0, 1.0)])
    with pytest.raises(ValueError, match="exactly one"):
        token_level_rewards(torch.tensor([1.0]), mask, turn_rewards=[(0, 1, 1.0)])
    with pytest.raises(ValueError, match="exactly one"):
        token_level_rewards(None, mask)
    with pytest.raises(ValueError, match="NaN or inf"):
        token_level_rewards(torch.tensor([NAN]), mask)


def test_kl_in_reward_is_subtracted_on_sampled_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1]])
    kl = torch.tensor([[0.1, -0.2, 0.3, INF], [NAN, 0.5, INF, 1.0]])  # garbage at mask-0 positions
    rewards = token_level_rewards(torch.tensor([1.0, 2.0]), mask, kl=kl, kl_coef=0.5)
    expected = [
        [-0.05, 0.1, 1.0 - 0.15, 0.0],  # -0.5 * kl; the reward 1.0 sits on token 2
        [0.0, -0.25, 0.0, 2.0 - 0.5],
    ]
    _close(rewards, expected)
    # Multi-turn with KL: both at once.
    rewards = token_level_rewards(None, mask, kl=kl, kl_coef=0.5, turn_rewards=[(1, 1, 3.0)])
    _close(rewards[1], [0.0, 3.0 - 0.25, 0.0, -0.5])


# ---------------------------------------------------------------- value loss


# values, old values and returns for three sampled tokens and one padded token holding garbage
V = [[1.0, 0.0, 2.0, NAN]]
V_OLD = [[0.5, 0.5, 2.0, INF]]
R = [[2.0, 1.0, 1.0, NAN]]
MASK = [[1, 1, 1, 0]]


def test_value_loss_by_hand_without_and_with_clipping():
    values = torch.tensor(V, requires_grad=True)
    loss, diag = value_loss(values, torch.tensor(V_OLD), torch.tensor(R), torch.tensor(MASK), value_clip=None)
    # 0.5 * mean((1-2)^2, (0-1)^2, (2-1)^2) = 0.5
    _close(loss, 0.5)
    loss.backward()
    # d/dV 0.5 * (V - R)^2 / 3 = (V - R) / 3; exactly 0 on the padded token despite its NaN
    _close(values.grad, [[-1 / 3, -1 / 3, 1 / 3, 0.0]])
    _close(diag["value_clip_fraction"], 0.0)
    _close(diag["value_mean"], 1.0)  # (1 + 0 + 2) / 3
    _close(diag["num_tokens"], 3.0)

    values = torch.tensor(V, requires_grad=True)
    loss, diag = value_loss(values, torch.tensor(V_OLD), torch.tensor(R), torch.tensor(MASK), value_clip=0.2)
    # token 0: clip(1.0, 0.3, 0.7) = 0.7 -> (0.7 - 2)^2 = 1.69 > (1 - 2)^2 = 1: clipped term wins
    # token 1: clip(0.0, 0.3, 0.7) = 0.3 -> (0.3 - 1)^2 = 0.49 < 1: unclipped wins
    # token 2: clip(2.0, 1.8, 2.2) = 2.0 -> equal terms, 1 (not counted as clipped)
    # 0.5 * (1.69 + 1 + 1) / 3 = 0.615
    _close(loss, 0.615)
    _close(diag["value_loss"], 0.615)
    _close(diag["value_clip_fraction"], 1 / 3)
    loss.backward()
    # token 0's clipped value is constant in V (outside [0.3, 0.7]): no gradient
    _close(values.grad, [[0.0, -1 / 3, 1 / 3, 0.0]])
    assert diag["value_loss"].grad_fn is None


def test_value_loss_global_denominator_by_hand():
    loss, _ = value_loss(
        torch.tensor(V), torch.tensor(V_OLD), torch.tensor(R), torch.tensor(MASK), value_clip=None, num_tokens=6
    )
    _close(loss, 0.25)  # 0.5 * 3 / 6


def test_value_loss_micro_batches_1x8_equal_8x1():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(8, 5, generator=g)
    old_values = values + 0.3 * torch.randn(8, 5, generator=g)
    returns = torch.randn(8, 5, generator=g)
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in [5, 3, 1, 4, 2, 5, 1, 3]])
    total = int(mask.sum())  # 24

    whole_values = values.clone().requires_grad_()
    whole, _ = value_loss(whole_values, old_values, returns, mask, value_clip=0.2, num_tokens=total)
    whole.backward()

    split_values = values.clone().requires_grad_()
    parts = [
        value_loss(split_values[i : i + 1], old_values[i : i + 1], returns[i : i + 1], mask[i : i + 1],
                   value_clip=0.2, num_tokens=total)[0]
        for i in range(8)
    ]
    sum(parts).backward()
    torch.testing.assert_close(sum(parts).detach(), whole.detach(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(split_values.grad, whole_values.grad, atol=1e-7, rtol=1e-6)
    # Each micro-batch's own token mean would weight rows equally instead: a different number.
    local = sum(
        value_loss(values[i : i + 1], old_values[i : i + 1], returns[i : i + 1], mask[i : i + 1], value_clip=0.2)[0]
        for i in range(8)
    ) / 8
    assert abs(local.item() - whole.item()) > 1e-3


@pytest.mark.parametrize("garbage", [0.0, 1e6, NAN, INF])
def test_masked_tokens_contribute_exactly_zero_to_value_loss_and_gradient(garbage):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 6, generator=g)
    old_values = values + 0.5 * torch.randn(3, 6, generator=g)
    returns = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]])  # pad and observation gaps

    clean = values.clone().requires_grad_()
    ref, ref_diag = value_loss(clean, old_values, returns, mask, value_clip=0.2)
    ref.backward()

    dirty_values = torch.where(mask.bool(), values, torch.tensor(garbage)).requires_grad_()
    dirty = lambda x: torch.where(mask.bool(), x, torch.tensor(garbage))  # noqa: E731
    loss, diag = value_loss(dirty_values, dirty(old_values), dirty(returns), mask, value_clip=0.2)
    loss.backward()
    assert torch.equal(loss.detach(), ref.detach())
    for key in ref_diag:
        assert torch.equal(diag[key], ref_diag[key]), key
    assert torch.equal(dirty_values.grad, clean.grad)
    assert (dirty_values.grad[mask == 0] == 0).all()
    assert (dirty_values.grad[mask == 1] != 0).any()


def test_value_clip_must_be_non_negative():
    with pytest.raises(ValueError, match="value_clip"):
        value_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), value_clip=-0.1)


# ---------------------------------------------------------------- diagnostics


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    _close(explained_variance(torch.tensor([[1.0, 2.0, 3.0, 4.0, INF]]), returns, mask), 1.0)  # perfect
    _close(explained_variance(torch.tensor([[7.0, 7.0, 7.0, 7.0, 0.0]]), returns, mask), 0.0)  # any constant
    # R - V = [1, 0, 0, 0]: Var = 0.75 / 3 = 0.25; Var(R) = 5 / 3; 1 - 0.25 / (5/3) = 0.85
    _close(explained_variance(torch.tensor([[0.0, 2.0, 3.0, 4.0, 0.0]]), returns, mask), 0.85)
    # worse than a constant: V = -R -> R - V = 2R, Var = 4 Var(R) -> 1 - 4 = -3
    _close(explained_variance(torch.tensor([[-1.0, -2.0, -3.0, -4.0, 0.0]]), returns, mask), -3.0)
    # returns without variance: nothing to explain, defined as 0 (not NaN)
    _close(explained_variance(torch.tensor([[1.0, 2.0]]), torch.tensor([[5.0, 5.0]]), torch.ones(1, 2)), 0.0)


def test_approx_kl_by_hand():
    logp = torch.tensor([[math.log(2.0) - 1.0, -1.0, NAN]], requires_grad=True)
    old_logp = torch.tensor([[-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # ratio 2: (2 - 1) - ln 2 = 0.306852819440; ratio 1: 0; mean over the two sampled tokens
    kl = approx_kl(logp, old_logp, mask)
    _close(kl, 0.15342640972002736)
    assert kl.grad_fn is None
    _close(approx_kl(old_logp, old_logp, mask), 0.0)


def test_masked_entropy_is_a_differentiable_token_mean_with_global_denominator():
    entropy = torch.tensor([[1.0, 2.0, NAN], [3.0, INF, 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    value = masked_entropy(entropy, mask)
    _close(value, 2.5)  # (1 + 2 + 3 + 4) / 4
    value.backward()
    _close(entropy.grad, [[0.25, 0.25, 0.0], [0.25, 0.0, 0.25]])
    _close(masked_entropy(entropy, mask, num_tokens=8), 1.25)


# ---------------------------------------------------------------- advantages


def test_ppo_advantages_by_hand_with_whitening():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 0.75]])
    mask = torch.ones(1, 4)
    # gamma = lam = 0.5, so gamma * lam = 0.25:
    # t=3: delta = 1 - 0.75 = 0.25                  A3 = 0.25
    # t=2: delta = 0.5 * 0.75 - 0.5 = -0.125        A2 = -0.125 + 0.25 * 0.25 = -0.0625
    # t=1: delta = 0.5 * 0.5 - 0.25 = 0             A1 = 0.25 * -0.0625 = -0.015625
    # t=0: delta = 0.5 * 0.25 - 0.5 = -0.375        A0 = -0.375 + 0.25 * -0.015625 = -0.37890625
    raw, returns = ppo_advantages(rewards, values, mask, gamma=0.5, lam=0.5, whiten=False)
    _close(raw, [[-0.37890625, -0.015625, -0.0625, 0.25]])
    _close(returns, [[0.12109375, 0.234375, 0.4375, 1.0]])  # A + V, from the raw advantages
    # whitened: mean -0.0517578125; deviations [-0.3271484375, 0.0361328125, -0.0107421875, 0.3017578125];
    # unbiased var = 0.1995048522949219 / 3 = 0.06650161743164062; divide by sqrt(var + 1e-8)
    advantages, returns = ppo_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    _close(advantages, [[-1.268611703510242, 0.1401153224772506, -0.04165590668242585, 1.1701522877154171]])
    _close(returns, [[0.12109375, 0.234375, 0.4375, 1.0]])  # returns are not whitened


def test_ppo_advantages_multi_turn_bootstraps_across_the_observation():
    # turn 1 = tokens 0-1, observation = token 2 (mask 0, garbage reward/value), turn 2 = token 3
    mask = torch.tensor([[1, 1, 0, 1]])
    rewards = token_level_rewards(None, mask, turn_rewards=[(0, 1, 1.0), (0, 3, 2.0)])
    values = torch.tensor([[0.5, 1.0, NAN, 1.5]])
    # gamma = 1, lam = 1: the observation is skipped, so token 1 bootstraps from token 3's value.
    # t=3: A = 2 - 1.5 = 0.5; t=1: delta = 1 + 1.5 - 1 = 1.5, A = 1.5 + 0.5 = 2; t=0: delta = 0 + 1 - 0.5 = 0.5,
    # A = 0.5 + 2 = 2.5 -> returns = A + V = [3, 3, 0, 2] (rewards to go: 1 + 2 and 2)
    advantages, returns = ppo_advantages(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    _close(advantages, [[2.5, 2.0, 0.0, 0.5]])
    _close(returns, [[3.0, 3.0, 0.0, 2.0]])
    whitened, _ = ppo_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert whitened[0, 2] == 0
    _close(whitened[mask.bool()].mean(), 0.0)
    _close(whitened[mask.bool()].std(), 1.0, atol=1e-6)


def test_gae_is_the_registered_critic_estimator_and_unknown_names_list_all():
    from runrl_engine.algorithms import get_advantage_estimator, uses_critic
    from runrl_engine.errors import ConfigError

    from runrl_engine.algorithms import gae

    assert ADVANTAGE_ESTIMATORS["gae"] is gae and uses_critic("gae")
    assert not any(uses_critic(n) for n in ("grpo", "dr_grpo", "rloo", "reinforce_pp"))
    with pytest.raises(ConfigError, match="dr_grpo, gae, grpo, reinforce_pp, rloo"):
        get_advantage_estimator("vtrace")


# ---------------------------------------------------------------- GSPO sequence-level importance ratio


def test_sequence_ratio_values_and_straight_through_gradient():
    old_logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    logp = torch.tensor([[-0.8, -1.6, NAN], [-0.8, -0.5, -0.2]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ratio = sequence_importance_ratio(logp, old_logp, mask)
    # row 0: mean(0.2, 0.4) = 0.3 -> e^0.3 = 1.3498588075760032 on both sampled tokens; row 1: mean(-0.3, 0, 0.3)
    # = 0 -> 1. TRL 1.16: exp(sum(log_ratio * mask) / mask.sum()), the same numbers as a [B, 1] column.
    # Mask-0 positions hold 1 (log ratio 0).
    e3 = 1.3498588075760032
    _close(ratio, [[e3, e3, 1.0], [1.0, 1.0, 1.0]])
    _close(sequence_log_ratio(logp, old_logp, mask), [[0.3, 0.3, 0.0], [0.0, 0.0, 0.0]])
    # Straight-through (GSPO-token): d ratio[i, t] / d logp[i, t] = s_i, no gradient across tokens.
    weights = torch.tensor([[1.0, 2.0, 5.0], [3.0, -1.0, 0.5]])
    (ratio * weights).sum().backward()
    _close(logp.grad, [[e3 * 1.0, e3 * 2.0, 0.0], [3.0, -1.0, 0.5]])


def test_gspo_with_per_sequence_advantages_has_plain_gspo_gradient():
    # Plain GSPO (TRL's [B, 1] ratio) differentiates through the mean: d s_i / d logp_t = s_i / L_i. Under the
    # grpo loss (mean over a row's tokens) the straight-through form gives the same gradient:
    # loss = -A * s / L summed over L tokens -> d/d logp_t = -A * s / L.
    old_logp = torch.tensor([[-1.0, -2.0, -1.5, 0.0]])
    logp = torch.tensor([[-0.9, -2.0, -1.4, 0.0]], requires_grad=True)  # mean log ratio (0.1 + 0 + 0.1) / 3
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, _ = policy_loss(
        old_logp + sequence_log_ratio(logp, old_logp, mask), old_logp, torch.tensor([2.0]), mask,
        loss_type="grpo", epsilon_low=0.2,
    )
    s = math.exp(0.2 / 3)  # 1.0689391057472464, inside [0.8, 1.2]: not clipped
    _close(loss, -2.0 * s)
    loss.backward()
    _close(logp.grad, [[-2.0 * s / 3, -2.0 * s / 3, -2.0 * s / 3, 0.0]])
