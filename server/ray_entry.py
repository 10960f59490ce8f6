"""The command a Ray job runs for one run: `python server/ray_entry.py RUN_DIR` (server/ray_executor.py).

It runs on a Ray node, as a plain file (standard library only, so it needs nothing but the run directory, which
the operator mounts at the same path on every node). It reads the launch plan the server wrote into the run
directory (`ray_launch.json`, mode 0600: the training argv, the environment entries it adds and the run's
secrets) and deletes it before anything else runs, so the secrets never pass through the job's entrypoint,
metadata or runtime environment, which anyone with access to Ray's dashboard or job API can read. It then runs
the training command as the local executor does: stdout appended to `process.log`, stderr to `stderr.log`, the
secrets on its stdin (`--secrets-stdin`). Its exit status goes to `ray_exit.json` (Ray reports only that a job
FAILED; the server must tell a user error, 2, from a traceback, 1, and from a kill), and it exits with it too
(128+N for a child killed by signal N). A SIGTERM or SIGINT (Ray's stop_job) is passed on to the training command,
whose exit is still recorded. Not covered: a node that dies with it (nothing is recorded; the server reads the
job's status instead).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# Run as a script, this file's directory (server/) is sys.path[0], where queue.py would shadow the standard
# library's `queue` for anything imported below; the packages come from the installed distribution instead.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from runrl_engine.rundir import RunDir  # noqa: E402

LAUNCH = RunDir(Path()).ray_launch.name
EXIT = RunDir(Path()).ray_exit.name


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: ray_entry.py RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[1])
    plan_path = run_dir / LAUNCH
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the launch plan {plan_path} on this Ray node ({exc})\n  fix: mount runrl serve's "
              "runs directory (its --data-dir/runs) at the same path on every Ray node", file=sys.stderr)
        return 2
    finally:
        plan_path.unlink(missing_ok=True)
    with open(RunDir(run_dir).process_log, "ab") as out, open(RunDir(run_dir).stderr_log, "wb") as err:
        proc = subprocess.Popen(plan["argv"], stdout=out, stderr=err, stdin=subprocess.PIPE,
                                env={**os.environ, **plan["env"]}, cwd=str(run_dir))

    def forward(signum: int, _frame: object) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    assert proc.stdin is not None
    try:
        proc.stdin.write(plan["stdin"].encode("utf-8"))
        proc.stdin.close()
    except OSError:  # the process died at once; its exit status tells why
        pass
    del plan
    code = proc.wait()
    tmp = run_dir / (EXIT + ".tmp")
    tmp.write_text(json.dumps({"code": code}), encoding="utf-8")
    os.replace(tmp, run_dir / EXIT)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
