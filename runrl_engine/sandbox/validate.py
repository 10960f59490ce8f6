"""`runrl validate reward|env` and the API's /validate/reward-function: check user code, then try it.

`validate_user_code` runs the static checks, and when they pass loads the code in the sandbox and calls it on
up to three sample prompt rows with a dummy completion, reporting what each call returned. It never raises for
mistakes in the user's code: they come back as `{"valid": false, "error", "errors"}`.

Without sample rows the code is called once with an empty row, and what that call does is a warning, not a
verdict: code that reads its row's fields (`kwargs["expected"]`, a required `answer` parameter) rightly fails
without them. The report then says so (`details.exercised_on_rows: false` and a `note`), and `valid` stands for
the static checks, the load and the call's use of resources: running out of memory, time, or a worker that died
(`RESOURCE_FAILURES`) does not depend on a row's fields and stays an error.

Not covered: prompt and SFT files (`runrl_engine.data`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from runrl_engine.errors import UserError
from runrl_engine.sandbox.isolation import detect_isolation
from runrl_engine.sandbox.static import _normal_mode, inspect_user_code

DUMMY_COMPLETION = "This is a sample completion used to check the reward function. <answer>42</answer>"
DUMMY_ACTION = "This is a sample action used to check the environment."
MAX_SAMPLES = 3
# Call errors that no missing row field explains: still errors when the code ran on an empty row.
RESOURCE_FAILURES = ("MemoryError", "timed out after", "the worker process died", "killed by SIG")
NOT_EXERCISED = ("no sample rows were given, so the code was not exercised on your rows' fields: it passed the "
                 "static checks and loaded, and a call with an empty row is reported under warnings only; give a "
                 "prompt file (prompt_file_id, or --prompts) to run it on up to 3 of its rows")


def validate_user_code(source: str, *, mode: str = "function", sample_rows: list[dict] | None = None,
                       timeout_s: float = 10, filename: str | None = None, allow_network: bool = False,
                       isolation: str = "auto", memory_mb: int = 4096, work_root: Path | None = None
                       ) -> dict[str, Any]:
    """{"valid", "error" (first message or None), "errors" (all), "details" (entry, contract, samples, ...)}.
    `work_root`: where the temporary directory goes (the server uses one under its data dir and empties it
    at start, so a kill mid-validation leaves nothing behind for long). With `isolation="bwrap"` and no
    working bubblewrap this raises `IsolationUnavailable` instead of running the code."""
    mode = _normal_mode(mode)
    name = filename or ("reward.py" if mode == "function" else "environment.py")
    details: dict[str, Any] = {"mode": mode, "filename": name}
    try:
        info = inspect_user_code(source, mode=mode, filename=name)
    except UserError as exc:
        return _report([exc.render()], {**details, "stage": "static", "where": exc.where})
    details.update(entry=info.entry, contract=info.contract, warnings=list(info.warnings), imports=list(info.imports))
    if info.env_init:
        details["env_init"] = info.env_init
    exercised = bool(sample_rows)
    rows = [dict(r) for r in (sample_rows or [{}])[:MAX_SAMPLES]]
    detect_isolation(isolation)  # fails closed before the code is written anywhere
    if work_root is not None:
        Path(work_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="runrl-validate-", dir=work_root) as tmp:
        path = Path(tmp) / "code.py"
        path.write_text(source, encoding="utf-8")
        options = dict(num_workers=1, timeout_s=timeout_s, load_timeout_s=max(30.0, timeout_s),
                       allow_network=allow_network, isolation=isolation, work_dir=Path(tmp), memory_mb=memory_mb,
                       display_name=name)
        try:
            if mode == "function":
                samples, errors = _try_reward(path, rows, options)
            else:
                samples, errors = _try_environment(path, rows, options)
        except UserError as exc:  # the module failed to load (import error, exception at module level)
            return _report([exc.render()], {**details, "stage": "load"})
    details.update(stage="run", samples=samples, samples_tested=len(samples) if exercised else 0,
                   exercised_on_rows=exercised)
    if not exercised:  # an empty row lacks the user's fields: its call's errors are not the code's defects
        details["note"] = NOT_EXERCISED
        resource = [e for e in errors if any(mark in e for mark in RESOURCE_FAILURES)]
        details["warnings"] = [*details["warnings"],
                               *(f"with an empty row (no sample rows): {e}" for e in errors if e not in resource)]
        return _report(resource, details)
    return _report(errors, details)


def _report(errors: list[str], details: dict[str, Any]) -> dict[str, Any]:
    return {"valid": not errors, "error": errors[0] if errors else None, "errors": errors, "details": details}


def _try_reward(path: Path, rows: list[dict], options: dict) -> tuple[list[dict], list[str]]:
    from runrl_engine.sandbox.reward import RewardSandbox

    with RewardSandbox(path, **options) as sandbox:
        results = sandbox.score([DUMMY_COMPLETION] * len(rows), rows)
        isolation = sandbox.mode
    samples, errors = [], []
    for i, result in enumerate(results):
        samples.append({"sample": i + 1, "reward": None if result.error else result.reward, "info": result.info,
                        "error": result.error, "isolation": isolation})
        if result.error:
            errors.append(f"sample {i + 1}: {result.error}")
    return samples, errors


def _try_environment(path: Path, rows: list[dict], options: dict) -> tuple[list[dict], list[str]]:
    from runrl_engine.sandbox.env import EnvSandbox

    samples, errors = [], []
    with EnvSandbox(path, **options) as sandbox:
        starts = sandbox.create(rows)
        live = [i for i, s in enumerate(starts) if s.error is None]
        steps = dict(zip(live, sandbox.step([starts[i].env_id for i in live], [DUMMY_ACTION] * len(live))))
        sandbox.close_envs([s.env_id for s in starts if s.error is None])
    for i, start in enumerate(starts):
        step = steps.get(i)
        error = start.error or (step.error if step else None)
        sample: dict[str, Any] = {"sample": i + 1, "error": error}
        if step is not None and step.error is None:
            sample.update(observation=step.observation, reward=step.reward, done=step.done, info=step.info)
        samples.append(sample)
        if error:
            errors.append(f"sample {i + 1}: {error}")
    return samples, errors
