"""The rough edges a new user hits on the command line (issue 13, findings 4, 7, 8, 9), from the outside:
`make quickstart` twice and `--overwrite`; one short message for a user error under a 2-process launcher;
`--version` and help on every `serve` option; `--set` mistakes reported against `--set`; no shared-tensor
message at checkpoints; an offline W&B run announced in logs.txt with its `wandb sync` command, completions
logged as a W&B table; an install without setuptools warnings.

W&B is offline here (no network): the online URL is covered only as a recorded value the server reads
(tests/server/test_cli_client.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from tests.engine.test_cli import QS, ROOT, assert_user_error, runrl, write_config

LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


# ---- finding 4: commands that can be run again ------------------------------------------------------------

@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv" / "bin" / "runrl").exists(),
                    reason="needs make and the repository's .venv (make install)")
def test_make_quickstart_twice(tmp_path, tiny_model_dir):
    """The README's first command, run a second time, trains again from scratch (it used to fail with
    `runs/quickstart already holds a run`). TRAIN_ARGS keeps it short; the target is the real one."""
    for name in ("configs", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    venv = ROOT / ".venv"

    def make(train_args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), f"VENV={venv}",
                               "-o", f"{venv}/.installed", "quickstart", f"TRAIN_ARGS={train_args}"],
                              capture_output=True, text=True, timeout=600, env=env())

    first = make("--set max_steps=3 --set save_every=1 --set eval_every=0")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    assert (run / "checkpoints" / "step-2").is_dir()
    second = make("--set max_steps=1 --set eval_every=0")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / "checkpoints" / "step-2").exists()  # nothing of the first run is left
    assert "resumed" not in (run / "logs.txt").read_text()


def test_overwrite_replaces_a_run_and_refuses_resume(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, max_steps=3, save_every=1)
    assert runrl("train", str(config), "--output", "out", cwd=tmp_path).returncode == 0
    assert (tmp_path / "out" / "checkpoints" / "step-2").is_dir()
    again = runrl("train", str(config), "--output", "out", cwd=tmp_path)
    assert_user_error(again, "already holds a run", "--resume", "--overwrite")
    both = runrl("train", str(config), "--output", "out", "--overwrite", "--resume", cwd=tmp_path)
    assert_user_error(both, "--overwrite", "--resume")
    fresh = runrl("train", str(config), "--output", "out", "--overwrite", "--set", "max_steps=1", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "out" / "checkpoints" / "step-2").exists()  # nothing of the first run is left
    # a run directory that holds the current directory is never deleted
    here = runrl("train", str(config), "--output", ".", "--overwrite", cwd=tmp_path / "out")
    assert_user_error(here, "--overwrite", "current directory")
    assert (tmp_path / "out" / "metrics.jsonl").is_file()


def _stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown_key", "after_process_group"])
def test_user_error_under_two_process_launch_is_one_message(tmp_path, tiny_model_dir, case):
    """A real 2-process launch (accelerate, gloo on CPU). `unknown_key` fails while the config loads;
    `after_process_group` (prompts_per_step=3 does not split over 2 processes) fails in the Trainer, after
    both processes joined the process group."""
    bad = {"num_generation": 4} if case == "unknown_key" else {"prompts_per_step": 3}
    needle = "unknown key 'num_generation'" if case == "unknown_key" else "does not split over 2 processes"
    config = write_config(tmp_path, **bad)
    train = ["train", str(config), "--output", str(tmp_path / "out")]
    cli = [sys.executable, "-m", "runrl_engine.cli"]

    proc = subprocess.run([*cli, "launch", *LAUNCH, *train], capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _stderr_lines(proc)
    assert lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert len(lines) <= 3 and proc.stderr.count(needle) == 1, proc.stderr  # once (rank 0), plus its fix

    # `accelerate launch` itself: the message is printed once, and torch's report names it as the root cause
    # (read from the error file the processes write) instead of "To enable traceback see ..."
    plain = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *LAUNCH, "-m", "runrl_engine.cli",
                            *train], capture_output=True, text=True, timeout=300, env=env())
    assert plain.returncode != 0
    # (rank 0 prints it, unless the agent stopped rank 0 first, after another process failed)
    assert sum(line.startswith("error: ") for line in plain.stderr.splitlines()) <= 1, plain.stderr
    assert "traceback : error: " in plain.stderr and "To enable traceback" not in plain.stderr, plain.stderr

    # the launcher's own report only behind the documented flag
    loud = subprocess.run([*cli, "launch", *LAUNCH, *train], capture_output=True, text=True, timeout=300,
                          env=env(RUNRL_TRACEBACK="1"))
    assert loud.returncode == 2 and "ChildFailedError" in loud.stderr and needle in loud.stderr


def test_launch_needs_a_train_command(tmp_path):
    proc = runrl("launch", "--num_processes", "2", cwd=tmp_path)
    assert_user_error(proc, "runrl launch", "train")


# ---- finding 8: --version, serve help, --set errors ---------------------------------------------------------

def test_version(tmp_path):
    from runrl_engine import __version__

    proc = runrl("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"runrl-engine {__version__}\n"


def test_every_serve_option_has_help(tmp_path):
    import argparse

    from server.cli import build_parser

    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    options = [a for a in serve._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert len(options) >= 12
    missing = [a.option_strings[0] for a in options if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, missing
    out = runrl("serve", "--help", cwd=tmp_path)
    assert out.returncode == 0 and "--data-dir" in out.stdout and "default: ~/.runrl" in out.stdout


@pytest.mark.parametrize("override,needles", [
    ("num_generation=4", ["--set num_generation=4: unknown key 'num_generation'", "did you mean 'num_generations'"]),
    ("epochs=abc", ["--set epochs=abc: expected an integer"]),
    ("epochs=1000", ["--set epochs=1000: 1000 is out of range", "<= 100"]),
    ("temperature=", ["--set temperature=: expected a number"]),
])
def test_set_errors_name_set(tmp_path, override, needles):
    config = write_config(tmp_path)
    proc = runrl("train", str(config), "--output", "out", "--set", override, cwd=tmp_path)
    assert_user_error(proc, *needles)
    assert "run.yaml" not in proc.stderr  # the YAML file is fine; the mistake is on the command line


def test_set_overrides_the_yaml_value_it_names(tmp_path):
    """An override is checked as an override, and the YAML's own mistakes are still reported against the YAML."""
    from runrl_engine.config import load_config
    from runrl_engine.errors import ConfigError

    config = write_config(tmp_path, epochs=1000)
    assert load_config(config, ["epochs=3"]).epochs == 3  # the bad YAML value is replaced, not reported
    with pytest.raises(ConfigError) as err:
        load_config(config, ["seed=4"])
    assert str(config) in err.value.render() and "--set" not in err.value.render()


# ---- finding 7: no warning spam ---------------------------------------------------------------------------

def test_checkpoints_print_no_shared_tensor_message(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, max_steps=2, save_every=1)
    proc = runrl("train", str(config), "--output", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoints" / "step-1").is_dir()  # a checkpoint of the tied-weights model
    for text in (proc.stderr, (tmp_path / "out" / "logs.txt").read_text()):
        assert "Removed shared tensor" not in text and "[RANK 0]" not in text


def test_only_the_shared_tensor_message_is_silenced(caplog):
    from runrl_engine.metrics import quiet_known_warnings

    quiet_known_warnings()
    quiet_known_warnings()  # idempotent
    logger = logging.getLogger("accelerate.utils.other")
    with caplog.at_level(logging.WARNING, logger="accelerate.utils.other"):
        logger.warning("Removed shared tensor {'lm_head.weight'} while saving. This should be OK")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_editable_install_has_no_setuptools_warnings(tmp_path):
    """What `pip install -e .` builds (the metadata, then the editable wheel), with warnings made visible: no
    license deprecation, no "Editable installation" notice (pip 26 shows both even with --quiet)."""
    code = ("import setuptools.build_meta as b; "
            f"b.prepare_metadata_for_build_editable({str(tmp_path)!r}); b.build_editable({str(tmp_path)!r})")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stderr[-3000:]


# ---- finding 9: W&B -----------------------------------------------------------------------------------------

def test_wandb_offline_run_is_announced_and_logs_a_completions_table(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    from runrl_engine import train
    from runrl_engine.metrics import WANDB_FILE, recorded_wandb_url

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import yaml

    cfg = yaml.safe_load(write_config(tmp_path, max_steps=2, num_generations=4, log_completions=3, report_to=["wandb"]).read_text())
    out = tmp_path / "run"
    train(cfg, output_dir=out)
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    log = (out / "logs.txt").read_text()
    assert f"wandb sync {offline[0].resolve()}" in log, log
    recorded = json.loads((out / WANDB_FILE).read_text())
    assert recorded["mode"] == "offline" and recorded["url"] is None and recorded["dir"] == str(offline[0].resolve())
    assert recorded_wandb_url(out) is None
    tables = sorted((offline[0] / "files" / "media" / "table").glob("completions_*.table.json"))
    assert len(tables) == 2  # one per step, as TRL logs them
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "prompt", "completion", "reward"]
    assert len(table["data"]) == 3 and {row[0] for row in table["data"]} == {1}
    completions = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [row[2] for row in table["data"]] == [c["completion"] for c in completions if c["step"] == 1]
    assert "user: " in table["data"][0][1] and str(QS) not in table["data"][0][1]
