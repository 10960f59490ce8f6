"""The policy-loss options of issue 17: `loss_type: cispo | sapo`, `delta`, `top_entropy_quantile`,
`mask_truncated_completions`. Their math is hand-tested in test_algorithms.py and parity-tested against TRL in
test_trl_parity.py; here: the config refuses what makes no sense (naming the key), and short real `train()` runs on
the builtin tiny model show each key reaches the update (its metrics appear, a fully truncated step trains nothing).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from runrl_engine import train
from runrl_engine.config import RESUMABLE_KEYS, RunConfig
from runrl_engine.errors import ConfigError
from tests.engine.test_trainer import cfg

BASE = {"model": "builtin:tiny", "prompt_file": "p.jsonl", "reward_file": "r.py"}
NEW_KEYS = {"delta", "sapo_temperature_pos", "sapo_temperature_neg", "top_entropy_quantile",
            "mask_truncated_completions"}


@pytest.mark.parametrize("values, key, says", [
    ({"loss_type": "cispo"}, "epsilon_high", "caps the importance weight at epsilon_high itself"),
    ({"loss_type": "cispo", "epsilon_high": 0.28}, "epsilon_high", "below the on-policy ratio 1"),
    ({"loss_type": "sapo", "delta": 4.0}, "delta", "has no clip"),
    ({"loss_type": "cispo", "epsilon_high": 5.0, "delta": 4.0}, "delta", "has no clip"),
    ({"delta": 1.2}, "delta", "not above 1 + epsilon_high = 1.2"),
    ({"epsilon_high": 0.28, "delta": 1.25}, "delta", "not above 1 + epsilon_high = 1.28"),
    ({"delta": 1.0}, "delta", "> 1"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile", ">= 0 and <= 1"),
    ({"top_entropy_quantile": -0.1}, "top_entropy_quantile", ">= 0 and <= 1"),
    ({"sapo_temperature_pos": 0}, "sapo_temperature_pos", "> 0"),
    ({"sapo_temperature_neg": -1}, "sapo_temperature_neg", "> 0"),
    ({"mask_truncated_completions": "yes"}, "mask_truncated_completions", "true or false"),
    ({"loss_type": "vespo"}, "loss_type", "'cispo', 'sapo'"),
])
def test_bad_values_are_refused_naming_the_key(values, key, says):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({**BASE, **values})
    text = err.value.render()
    assert f"config: {key}" in text and says in text, text


def test_good_values_load_and_none_of_the_keys_may_change_on_resume():
    ok = RunConfig.from_dict({**BASE, "loss_type": "cispo", "epsilon_high": 5.0, "top_entropy_quantile": 0.2,
                              "mask_truncated_completions": True})
    assert ok.clip_high == 5.0 and ok.top_entropy_quantile == 0.2
    assert RunConfig.from_dict({**BASE, "epsilon_high": 0.28, "delta": 4}).delta == 4.0
    assert RunConfig.from_dict({**BASE, "loss_type": "sapo", "sapo_temperature_neg": 2}).sapo_temperature_neg == 2.0
    defaults = RunConfig.from_dict(BASE)
    assert (defaults.delta, defaults.top_entropy_quantile, defaults.mask_truncated_completions) == (None, 1.0, False)
    assert (defaults.sapo_temperature_pos, defaults.sapo_temperature_neg) == (1.0, 1.05)  # TRL 1.16's defaults
    assert not NEW_KEYS & RESUMABLE_KEYS  # each changes what the update computes


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cispo_with_top_entropy_quantile_in_a_real_run(tmp_path, tiny_model_dir):
    # ppo_epochs 2: the second pass is off-policy (ratios move); the entropy bonus acts on the kept tokens only
    train(cfg(loss_type="cispo", epsilon_high=5.0, top_entropy_quantile=0.5, entropy_coef=0.01, ppo_epochs=2,
              max_steps=1), output_dir=tmp_path)
    (m,) = _metrics(tmp_path)
    assert 0.4 <= m["top_entropy/kept_fraction"] <= 0.75  # about half of the trained tokens (ties are kept)
    assert "cispo_clip_ratio" in m and m["ratio_max"] != 1.0 and m["grad_norm"] > 0
    assert "masked_truncated_fraction" not in m and "clip_ratio/delta_mean" not in m


def test_sapo_and_delta_in_real_runs(tmp_path, tiny_model_dir):
    train(cfg(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=3.0, ppo_epochs=2, max_steps=1),
          output_dir=tmp_path / "sapo")
    (m,) = _metrics(tmp_path / "sapo")
    assert 0.5 < m["sapo/gate_mean"] < 1.0 and m["grad_norm"] > 0  # off-policy in pass 2: the gate closes a bit
    assert "top_entropy/kept_fraction" not in m
    train(cfg(loss_type="grpo", delta=1.5, ppo_epochs=2, max_steps=1), output_dir=tmp_path / "delta")
    (m,) = _metrics(tmp_path / "delta")
    assert 0.0 <= m["clip_ratio/delta_mean"] <= 1.0 and m["grad_norm"] > 0


def test_a_step_whose_completions_are_all_truncated_trains_nothing(tmp_path, tiny_model_dir):
    # completion_length 1: a completion is one token, truncated unless that token is the EOS; this seed gives a
    # step with every completion truncated (asserted, not assumed). The other runs here, as truncated, do train.
    train(cfg(mask_truncated_completions=True, completion_length=1, max_steps=1), output_dir=tmp_path)
    (m,) = _metrics(tmp_path)
    assert m["truncated_fraction"] == 1.0 and m["masked_truncated_fraction"] == 1.0
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0
    assert "every completion of this optimizer step (8) was truncated" in (tmp_path / "logs.txt").read_text()
    # the first optimizer step with zero gradients (AdamW's moments start at 0, no weight decay) moves nothing
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], base[k]) for k in base)
