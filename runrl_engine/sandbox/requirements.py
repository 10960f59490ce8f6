"""Installing a run's `package_requirements` into a directory only the sandbox workers import from.

`install_requirements` runs `pip install --target DIR` as a sandboxed subprocess (same launcher, scrubbed
environment, network allowed), because building an sdist executes code from the package: it must not see
the trainer's secrets. The trainer process never puts DIR on its own `sys.path`. Requirements the worker
interpreter already satisfies are skipped (so `numpy` does not re-download numpy, nor `torch` a CUDA build).

Entries are requirement specifiers only (`check_requirements`): a name with optional extras, version
specifiers and an environment marker, or `name @ https://...` when URLs are allowed. Never a host path, never
a pip option: nothing of the host's file system is bound into the pip sandbox or named in an error, so an
entry cannot read host files nor learn whether a path exists. `find_links` (operator or test use, not user
input) adds local wheel directories, bound read-only.

Not covered: caching between runs (each run installs into its own fresh directory, pip's cache is off); the
package index itself (pip reaches it with the host's network inside the sandbox).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from runrl_engine.errors import UserError
from runrl_engine.sandbox.isolation import Launcher, detect_isolation, release_memory_cgroup
from runrl_engine.secrets import env_secret_values, redact

_FIX = "check each entry is a pip requirement that exists on the package index (e.g. 'sympy==1.13'), or remove it"
_SPEC_FIX = ("write each entry as a requirement specifier: a package name with optional [extras], versions and a "
             "marker, e.g. 'sympy>=1.12' or 'requests[socks]==2.32.3; python_version>=\"3.9\"'")


def check_requirements(requirements: Sequence[Any], *, allow_urls: bool = True) -> list[str]:
    """The entries as requirement strings, or UserError naming the first bad one. URL requirements must be
    http(s) and are refused unless `allow_urls`; paths, pip options and anything else unparseable are refused
    without looking at the file system."""
    from packaging.requirements import InvalidRequirement, Requirement

    specs: list[str] = []
    for i, raw in enumerate(requirements, start=1):
        if not isinstance(raw, str):
            raise UserError(f"entry {i} is {type(raw).__name__}, not a string", where="package_requirements",
                            fix=_SPEC_FIX)
        spec = raw.strip()
        if not spec:
            continue
        shown = spec if len(spec) <= 80 else spec[:77] + "..."
        if spec.startswith("-"):
            raise UserError(f"entry {i} ({shown!r}) is a pip option, not a requirement", where="package_requirements",
                            fix=_SPEC_FIX)
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            raise UserError(f"entry {i} ({shown!r}) is not a requirement specifier (paths and local files are not "
                            f"accepted)", where="package_requirements", fix=_SPEC_FIX) from None
        if req.url is not None:
            if not allow_urls:
                raise UserError(f"entry {i} ({shown!r}) installs from a URL, which this server does not allow",
                                where="package_requirements",
                                fix="name a package from the index instead (the operator of `runrl serve` can "
                                    "allow URL requirements with --allow-url-requirements)")
            if not req.url.lower().startswith(("https://", "http://")):
                raise UserError(f"entry {i} ({shown!r}) has a non-http(s) URL", where="package_requirements",
                                fix="use an https:// URL of a wheel or source archive, or a package name")
        specs.append(spec)
    return specs


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
                         memory_mb: int = 8192, secrets: Sequence[str] = (), allow_urls: bool = True,
                         find_links: Sequence[Path] = (), egress: Any = None) -> Path:
    """Install `requirements` into `target_dir` (replaced atomically); on failure raise `UserError` with pip's
    message. `extra_args` go to pip before the requirements (tests use `--no-index`); `find_links` are local
    wheel directories (bound read-only into the sandbox). `egress` (a `netpolicy.DestinationPolicy`, bubblewrap
    only): pip's network goes through an egress proxy with that policy instead of the host's network (the
    index must then be a public address or an allowed destination; an upstream HTTP proxy is not used)."""
    say = log or (lambda message: None)
    target_dir = Path(target_dir).resolve()
    reqs: list[str] = []
    for spec in check_requirements(requirements, allow_urls=allow_urls):
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
            links = [str(Path(d).resolve()) for d in find_links]
            extra = [*extra_args, *(arg for d in links for arg in ("--find-links", d))]
            _run_pip(reqs, staging, private, say, timeout_s=timeout_s, extra_args=extra, extra_ro=links,
                     isolation=isolation, memory_mb=memory_mb, secrets=[*secrets, *env_secret_values()],
                     egress=egress)
        if target_dir.exists():
            shutil.rmtree(target_dir)
        os.replace(staging, target_dir)
        os.chmod(target_dir, 0o755)  # mkdtemp makes it 0700; an unprivileged worker must read it
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    return target_dir


def _run_pip(reqs: list[str], target: Path, private: Path, say: Callable[[str], None], *, timeout_s: float,
             extra_args: Sequence[str], extra_ro: Sequence[str], isolation: str, memory_mb: int,
             secrets: list[str], egress: Any = None) -> None:
    if egress is None:
        _run_pip_with(None, reqs, target, private, say, timeout_s=timeout_s, extra_args=extra_args,
                      extra_ro=extra_ro, isolation=isolation, memory_mb=memory_mb, secrets=secrets)
        return
    from runrl_engine.sandbox.egress import EgressProxy

    with EgressProxy(egress, log=say) as proxy:  # its own private directory, outside the sandbox
        _run_pip_with(proxy.path, reqs, target, private, say, timeout_s=timeout_s, extra_args=extra_args,
                      extra_ro=extra_ro, isolation=isolation, memory_mb=memory_mb, secrets=secrets)


def _run_pip_with(egress_socket: Path | None, reqs: list[str], target: Path, private: Path,
                  say: Callable[[str], None], *, timeout_s: float, extra_args: Sequence[str], extra_ro: Sequence[str],
                  isolation: str, memory_mb: int, secrets: list[str]) -> None:
    launcher = Launcher(detect_isolation(isolation), allow_network=True, limits={"data_mb": memory_mb},
                        egress_socket=egress_socket)
    cmd = ["install", "--target", str(target), "--no-input", "--no-cache-dir", "--disable-pip-version-check",
           "--no-warn-script-location", "--progress-bar", "off", *extra_args, "--", *reqs]
    say(f"pip {' '.join(cmd)}")
    proc = launcher.spawn(private, role="pip", extra_args=cmd, extra_ro=extra_ro, extra_rw=[str(target)],
                          pipe_stdin=False)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        release_memory_cgroup(getattr(proc, "memory_cgroup", None))
        raise UserError(f"installing package_requirements took longer than {timeout_s:g} s",
                        where="package_requirements", fix="install fewer or smaller packages") from None
    release_memory_cgroup(getattr(proc, "memory_cgroup", None))
    stdout = out.decode("utf-8", errors="replace")
    if proc.returncode != 0:
        tail = (err.decode("utf-8", errors="replace").strip() or stdout.strip())[-2000:]
        raise UserError(f"pip could not install package_requirements (exit code {proc.returncode}):\n"
                        f"{redact(tail, secrets)}", where="package_requirements", fix=_FIX)
    done = [line for line in stdout.splitlines() if line.startswith("Successfully installed")]
    say(done[-1] if done else "package_requirements installed")
