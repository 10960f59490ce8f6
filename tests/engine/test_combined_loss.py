"""The pure pieces the update assembles (`algorithms/`): PPO's combined loss, explained variance from reduced
variances, and the config options each advantage estimator declares."""

from __future__ import annotations

import pytest
import torch

from runrl_engine.algorithms.advantages import advantage_options
from runrl_engine.algorithms.ppo import combined_loss, explained_variance, explained_variance_from
from runrl_engine.errors import ConfigError


def test_explained_variance_has_one_formula_for_tensors_and_reduced_floats():
    returns = torch.tensor([[1.0, 2.0, 4.0]])
    values = torch.tensor([[1.5, 2.0, 3.0]])
    mask = torch.ones_like(returns)
    var_r = float(returns.var())
    var_e = float((returns - values).var())
    assert float(explained_variance(values, returns, mask)) == pytest.approx(1 - var_e / var_r)
    assert explained_variance_from(var_r, var_e) == pytest.approx(1 - var_e / var_r)
    assert explained_variance_from(0.0, 1.0) == 0.0  # nothing to explain


def test_combined_loss_adds_value_and_subtracts_the_entropy_bonus():
    pg = torch.tensor(0.5, requires_grad=True)
    entropy = torch.tensor(2.0, requires_grad=True)
    value = torch.tensor(0.25, requires_grad=True)
    loss = combined_loss(pg, entropy=entropy, entropy_coef=0.01, value=value, vf_coef=0.5)
    assert float(loss.detach()) == pytest.approx(0.5 - 0.02 + 0.125)
    loss.backward()
    assert (float(pg.grad), float(entropy.grad), float(value.grad)) == pytest.approx((1.0, -0.01, 0.5))
    # a zero coefficient keeps the entropy out of the graph: it is then only a diagnostic
    alone = combined_loss(pg, entropy=entropy, entropy_coef=0.0)
    assert alone is pg


def test_estimators_declare_the_config_options_they_take():
    assert advantage_options("grpo") == ("scale_rewards",)
    assert advantage_options("rloo") == () and advantage_options("gae") == ()
    with pytest.raises(ConfigError):
        advantage_options("no_such_estimator")
