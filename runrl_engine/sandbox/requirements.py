"""Installing a run's `package_requirements` into a directory only the sandbox workers import from.

`install_requirements` runs `pip install --target DIR` as a sandboxed subprocess (same launcher, scrubbed
environment, network allowed), because building an sdist executes code from the package: it must not see
the trainer's secrets. The trainer process never puts DIR on its own `sys.path`. Requirements the worker
interpreter already satisfies are skipped (so `numpy` does not re-download numpy, nor `torch` a CUDA build).

Not covered: caching between runs (each run installs into its own fresh directory, pip's cache is off).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from runrl_engine.errors import UserError
from runrl_engine.sandbox.isolation import Launcher, detect_isolation, env_secret_values, redact

_FIX = "check each entry is a pip requirement that exists on the package index (e.g. 'sympy==1.13'), or remove it"


def _already_satisfied(spec: str) -> str | None:
    """'name version' when the interpreter already has a distribution meeting `spec`; None otherwise."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # packaging is not a hard dependency; without it every entry is installed
        return None
    try:
        req = Requirement(spec)
    except InvalidRequirement:
        return None  # let pip report it in its own words
    if req.url or req.extras or (req.marker is not None and not req.marker.evaluate()):
        return None
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        return None
    return f"{req.name} {installed}" if req.specifier.contains(installed, prereleases=True) else None


def install_requirements(requirements: Sequence[str], target_dir: Path, log: Callable[[str], None] | None = None,
                         *, timeout_s: float = 900.0, extra_args: Sequence[str] = (), isolation: str = "auto",
                         memory_mb: int = 8192, secrets: Sequence[str] = ()) -> Path:
    """Install `requirements` into `target_dir` (replaced atomically); on failure raise `UserError` with pip's
    message. `extra_args` go to pip before the requirements (tests use `--no-index`)."""
    say = log or (lambda message: None)
    target_dir = Path(target_dir).resolve()
    reqs: list[str] = []
    for raw in requirements:
        spec = str(raw).strip()
        if not spec:
            continue
        if spec.startswith("-"):
            raise UserError(f"package_requirements entry {spec!r} is a pip option, not a requirement",
                            where="package_requirements", fix=_FIX)
        satisfied = _already_satisfied(spec)
        if satisfied:
            say(f"package_requirements: {spec} already satisfied by {satisfied}; not reinstalled")
            continue
        reqs.append(spec)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=target_dir.parent))
    private = Path(tempfile.mkdtemp(prefix=".pip-home-", dir=target_dir.parent))
    try:
        if reqs:
            _run_pip(reqs, staging, private, say, timeout_s=timeout_s, extra_args=extra_args,
                     isolation=isolation, memory_mb=memory_mb, secrets=[*secrets, *env_secret_values()])
        if target_dir.exists():
            shutil.rmtree(target_dir)
        os.replace(staging, target_dir)
        os.chmod(target_dir, 0o755)  # mkdtemp makes it 0700; an unprivileged worker must read it
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    return target_dir


def _run_pip(reqs: list[str], target: Path, private: Path, say: Callable[[str], None], *, timeout_s: float,
             extra_args: Sequence[str], isolation: str, memory_mb: int, secrets: list[str]) -> None:
    # A local path requirement (a wheel or a project directory) must be visible inside the sandbox.
    local = [str(Path(r).resolve()) for r in reqs if os.path.exists(r)]
    args = [str(Path(r).resolve()) if os.path.exists(r) else r for r in reqs]
    launcher = Launcher(detect_isolation(isolation), allow_network=True, limits={"data_mb": memory_mb})
    cmd = ["install", "--target", str(target), "--no-input", "--no-cache-dir", "--disable-pip-version-check",
           "--no-warn-script-location", "--progress-bar", "off", *extra_args, *args]
    say(f"pip {' '.join(cmd)}")
    proc = launcher.spawn(private, role="pip", extra_args=cmd, extra_ro=local, extra_rw=[str(target)],
                          pipe_stdin=False)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise UserError(f"installing package_requirements took longer than {timeout_s:g} s",
                        where="package_requirements", fix="install fewer or smaller packages") from None
    stdout = out.decode("utf-8", errors="replace")
    if proc.returncode != 0:
        tail = (err.decode("utf-8", errors="replace").strip() or stdout.strip())[-2000:]
        raise UserError(f"pip could not install package_requirements (exit code {proc.returncode}):\n"
                        f"{redact(tail, secrets)}", where="package_requirements", fix=_FIX)
    done = [line for line in stdout.splitlines() if line.startswith("Successfully installed")]
    say(done[-1] if done else "package_requirements installed")
