"""The update's bookkeeping (`runrl_engine.update`): each statistic reduced as `REDUCTIONS` declares, over
micro-batches and optimizer steps, and batch-wide masked moments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from runrl_engine.update import MAX, SUM, TOKEN_MEAN, StepStats, global_moments, mean_over_steps, reduction_of

ONE_PROCESS = SimpleNamespace(num_processes=1, device="cpu")


def test_each_statistic_has_one_declared_reduction():
    assert reduction_of("loss") == reduction_of("pg_loss") == reduction_of("sampling/kl") == SUM
    assert reduction_of("ratio_max") == reduction_of("sampling/is_ratio_max") == MAX
    assert reduction_of("clip_ratio/region_mean") == reduction_of("approx_kl") == TOKEN_MEAN  # the default


def test_step_stats_sum_shares_weight_token_means_and_keep_maxima():
    stats = StepStats()
    # two micro-batches of 3 and 1 tokens: a share (summed), a token mean (weighted), a maximum, the weight itself
    stats.add({"loss": 0.25, "approx_kl": 0.5, "ratio_max": 1.5, "num_tokens": 3.0}, tokens=3.0)
    stats.add({"loss": 0.5, "approx_kl": 0.1, "ratio_max": 1.25, "num_tokens": 1.0}, tokens=1.0)
    out = stats.reduce(ONE_PROCESS, n_tok=4)
    assert out == pytest.approx({"loss": 0.75, "approx_kl": (0.5 * 3 + 0.1) / 4, "ratio_max": 1.5})


def test_optimizer_steps_average_except_maxima():
    steps = [{"loss": 1.0, "grad_norm": 2.0, "ratio_max": 1.1}, {"loss": 3.0, "grad_norm": 4.0, "ratio_max": 1.7}]
    assert mean_over_steps(steps) == pytest.approx({"loss": 2.0, "grad_norm": 3.0, "ratio_max": 1.7})


def test_global_moments_are_the_masked_count_mean_and_unbiased_variance():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 6.0, -7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    m = global_moments(ONE_PROCESS, mask, {"x": x, "twice": 2 * x})["x"]
    assert (m.n, m.mean, m.var) == pytest.approx((4, 3.0, (4 + 1 + 0 + 9) / 3))
    assert global_moments(ONE_PROCESS, mask, {"twice": 2 * x})["twice"].var == pytest.approx(4 * m.var)
