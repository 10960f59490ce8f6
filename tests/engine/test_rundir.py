"""runrl_engine/rundir.py: the run directory's names, which the engine writes and the server reads."""

from __future__ import annotations

from pathlib import Path

from runrl_engine import checkpoint
from runrl_engine.rundir import INPUT_KEYS, RunDir
from tests.engine.test_secrets import ROOT, non_stdlib_imports


def test_the_names_the_engine_and_the_server_agree_on(tmp_path):
    run = RunDir(tmp_path)
    names = {"config": "config.yaml", "metrics": "metrics.jsonl", "completions": "completions.jsonl",
             "log": "logs.txt", "wandb": "wandb.json", "checkpoints": "checkpoints", "final": "final",
             "hub_push": "hf_push.json", "sandbox": "sandbox", "reward_env": "reward_env", "inputs": "inputs",
             "launch_config": "run.yaml", "process_log": "process.log", "stderr_log": "stderr.log"}
    for attribute, name in names.items():
        assert getattr(run, attribute) == tmp_path / name, attribute
    assert run.checkpoint(12) == tmp_path / "checkpoints" / "step-12"
    assert [run.input_copy(k).name for k in INPUT_KEYS] == ["prompt.jsonl", "reward.py", "sft.jsonl"]
    assert [p.name for p in run.leftovers] == ["run.yaml", "sandbox", "reward_env"]
    assert checkpoint.PUSH_RECORD == "hf_push.json"


def test_checkpoint_step_reads_only_whole_checkpoint_names():
    assert RunDir.checkpoint_step(Path("checkpoints/step-40")) == 40
    for name in ("step-40.tmp", "step-", "step-x", "final", "step-4-0"):
        assert RunDir.checkpoint_step(Path(name)) is None, name


def test_a_half_written_checkpoint_is_not_the_latest(tmp_path):
    """A crash between writing trainer_state.json and the rename leaves `step-N.tmp`: resuming uses the last
    whole checkpoint."""
    run = RunDir(tmp_path)
    for name in ("step-2", "step-10", "step-12.tmp"):
        (run.checkpoints / name).mkdir(parents=True)
        (run.checkpoints / name / checkpoint.STATE_FILE).write_text("{}")
    assert checkpoint.latest_checkpoint(tmp_path) == run.checkpoint(10)  # 10 > 2: by number, not by name


def test_has_trained_and_has_model(tmp_path):
    run = RunDir(tmp_path)
    assert not run.has_trained and not run.has_model
    run.checkpoints.mkdir()
    assert run.has_trained
    run.final.mkdir()
    assert not run.has_model
    (run.final / "adapter_config.json").write_text("{}")  # a LoRA adapter (merge_lora: false) is a model too
    assert run.has_model


def test_the_module_imports_only_the_standard_library():
    assert non_stdlib_imports(ROOT / "runrl_engine" / "rundir.py") == []
