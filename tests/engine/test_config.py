import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from runrl_engine.config import RunConfig, apply_overrides, field_help, load_config
from runrl_engine.errors import ConfigError

BASE = {"model": "builtin:tiny", "prompt_file": "p.jsonl", "reward_file": "r.py"}


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_round_trip_and_relative_paths(tmp_path):
    path = write(tmp_path, "model: builtin:tiny\nprompt_file: data/p.jsonl\nreward_file: /abs/r.py\nepochs: 3\n"
                           "learning_rate: 1e-5\ntools: [http://127.0.0.1:9/mcp]\n")
    cfg = load_config(path)
    assert cfg.prompt_file == str(tmp_path / "data/p.jsonl")
    assert cfg.reward_file == "/abs/r.py"
    assert cfg.epochs == 3 and cfg.learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as a string; we accept it
    again = RunConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_overrides_are_yaml_scalars(tmp_path):
    path = write(tmp_path, "model: builtin:tiny\nprompt_file: p\nreward_file: r\n")
    cfg = load_config(path, ["epochs=4", "use_lora=true", "beta=0.04", "tools=http://x/mcp", "hf_name=null"])
    assert (cfg.epochs, cfg.use_lora, cfg.beta, cfg.tools, cfg.hf_name) == (4, True, 0.04, ["http://x/mcp"], None)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "model: builtin:tiny\nprompt_file: p\nreward_file: r\nnum_generation: 4\n"))
    text = err.value.render()
    assert "num_generation" in text and "did you mean 'num_generations'" in text and str(tmp_path) in text


@pytest.mark.parametrize("key,value,expect", [
    ("epochs", 0, ">= 1 and <= 100"),
    ("learning_rate_multiplier", 20, "<= 10"),
    ("temperature", 0, "> 0"),
    ("num_generations", 2.5, "integer"),
    ("use_lora", "yes", "true or false"),
    ("loss_type", "ppo", "'grpo', 'dr_grpo', 'dapo', 'bnpo'"),
    ("device", "tpu", "'auto', 'cpu', 'cuda'"),
    ("advantage_estimator", "vtrace", "'grpo', 'dr_grpo', 'rloo', 'reinforce_pp', 'gae'"),
    ("importance_sampling_level", "batch", "'token', 'sequence'"),
    ("critic", "shared", "'head', 'separate'"),
    ("ppo_epochs", 0, ">= 1"),
])
def test_bad_values_say_the_allowed_range(key, value, expect):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({**BASE, key: value})
    assert key in err.value.render() and expect in err.value.render()


def test_estimator_defaults_follow_the_algorithm_and_mismatches_are_refused():
    assert RunConfig.from_dict(BASE).advantage_estimator == "grpo"
    ppo = RunConfig.from_dict({**BASE, "algorithm": "ppo"})
    assert ppo.advantage_estimator == "gae" and RunConfig.from_dict(ppo.to_dict()) == ppo
    assert RunConfig.from_dict({**BASE, "advantage_estimator": "rloo", "ppo_epochs": 2}).ppo_epochs == 2
    cases = [({"algorithm": "ppo", "advantage_estimator": "rloo"}, "advantage_estimator", "algorithm: grpo"),
             ({"advantage_estimator": "gae"}, "advantage_estimator", "algorithm: ppo"),
             ({"kl_in_reward": True, "beta": 0.1}, "kl_in_reward", "kl_in_reward: false"),
             ({"num_minibatches": 65}, "num_minibatches", "at most 64")]
    for extra, key, fix in cases:
        with pytest.raises(ConfigError) as err:
            RunConfig.from_dict({**BASE, **extra})
        assert key in err.value.render() and fix in err.value.render(), err.value.render()


def test_missing_required_key():
    with pytest.raises(ConfigError, match="required key 'reward_file'"):
        RunConfig.from_dict({"model": "x", "prompt_file": "p"})


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "model: builtin:tiny\nprompt_file: [oops\nreward_file: r\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:" in err.value.render() and "malformed YAML" in err.value.render() and f"{path}:2:" in err.value.render()


def test_secrets_are_redacted():
    cfg = RunConfig.from_dict({**BASE, "hf_token": "hf_abcdefghijklmnop"})
    assert "hf_abcdefghijklmnop" not in cfg.to_yaml()
    assert cfg.secrets() == ["hf_abcdefghijklmnop"]


def test_learning_rate_resolution():
    assert RunConfig.from_dict(BASE).effective_learning_rate == pytest.approx(5e-6)
    lora = RunConfig.from_dict({**BASE, "use_lora": True, "learning_rate_multiplier": 2})
    assert lora.effective_learning_rate == pytest.approx(4e-5)
    assert not RunConfig.from_dict({**BASE, "use_lora": True, "lora_rank": 0}).lora_enabled


def test_choices_match_the_algorithm_registries():
    from runrl_engine.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from runrl_engine.algorithms.losses import LOSS_TYPES

    hints = typing.get_type_hints(RunConfig)
    assert set(typing.get_args(hints["loss_type"])) == set(LOSS_TYPES)
    literal = next(a for a in typing.get_args(hints["advantage_estimator"]) if a is not type(None))
    assert set(typing.get_args(literal)) == set(ADVANTAGE_ESTIMATORS)
    # the config's own notion of which estimator needs a critic (no torch import there) matches the registry
    from runrl_engine.algorithms.advantages import CRITIC_ESTIMATORS

    assert CRITIC_ESTIMATORS == {"gae"}


def test_every_field_documented():
    assert all(text.strip() for text in field_help().values())


def test_config_import_does_not_import_torch():
    code = "import runrl_engine, runrl_engine.config, runrl_engine.data, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert Path(cfg.prompt_file).is_file() and Path(cfg.reward_file).is_file()
