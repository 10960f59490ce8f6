"""The engine's `runrl` commands: train, launch (several processes), validate.

`build_parser(extend)` and `main(argv, build)` are the whole command line's skeleton; `server/cli.py` adds serve,
keys and runs (the `runrl` entry point lives there, since the server may import the engine and the engine never
imports the server). `python -m runrl_engine.cli` is the engine alone: the server's worker and `runrl launch`'s
processes run `train` through it.

User mistakes (`UserError`) print one message naming the file/line/key and the fix, and exit with status 2;
no traceback, and under a multi-process launcher once, not once per process (`runrl launch` also keeps
torch's failure report out; RUNRL_TRACEBACK=1 shows it). Engine bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from runrl_engine.errors import UserError
from runrl_engine.rundir import RunDir

EXIT_USER_ERROR = 2


def _train(args: argparse.Namespace) -> int:
    from runrl_engine.config import load_config

    if args.overwrite and args.resume:
        raise UserError("--overwrite deletes the run that --resume would continue", where="--overwrite --resume",
                        fix="pass --resume to continue the run, or --overwrite to start it again from scratch")
    if os.environ.get(_LAUNCHED) == "1":
        _die_with_launcher()
    secrets = None
    if args.secrets_stdin:
        # under `runrl launch` the launcher read stdin once and hands each process its copy (see _launch); it is
        # removed from the environment at once, so nothing this process starts inherits it
        text = os.environ.pop(_SECRETS_ENV, None)
        try:
            secrets = json.loads((sys.stdin.read() if text is None else text) or "{}")
        except json.JSONDecodeError as exc:
            raise UserError(f"stdin is not a JSON object: {exc}", where="--secrets-stdin",
                            fix='write one JSON object such as {"hf_token": "hf_..."} to stdin') from None
        if not isinstance(secrets, dict):
            raise UserError("stdin is not a JSON object", where="--secrets-stdin",
                            fix='write one JSON object such as {"hf_token": "hf_..."} to stdin')
    cfg = load_config(args.config, args.set or [], secrets)
    # SIGTERM (a cancelled run, a stopping server) unwinds like Ctrl-C: the sandbox workers, their private
    # directories and the MCP sessions are closed by the trainer's `finally`, nothing is left on disk.
    signal.signal(signal.SIGTERM, _terminated)
    out = Path(args.output) if args.output else Path("runs") / Path(args.config).stem
    run = RunDir(out)
    if args.overwrite:
        _clear_run(out, Path(args.config))
    elif not args.resume and run.metrics.exists():
        raise UserError(f"{out} already holds a run", where="--output",
                        fix="pass --resume to continue it, --overwrite to replace it, or choose another --output "
                            "directory")
    notes: list[str] = []
    if args.resume and run.config.is_file():
        # the run's own config (its first --set overrides included) is what continues; the YAML given now only
        # brings the secrets config.yaml holds redacted, and this invocation's --set are the changes
        from runrl_engine.config import resume_config

        cfg, notes = resume_config(run.config, cfg, args.set or [], source=args.config)
    if args.resume:  # refusals and "nothing to do" answered before torch is imported (the trainer checks again)
        from runrl_engine import checkpoint

        point = checkpoint.resume_point(out, cfg)
        if point is not None and point.complete:
            main = int(os.environ.get("RANK", "0")) == 0  # accelerate launch / torchrun set RANK
            last = checkpoint.announce_complete(point, main=main)
            if main:
                _print_summary(out, run.final, point.step, last)
            return 0
    from runrl_engine.trainer import run_training

    result = run_training(cfg, out, resume=args.resume, notes=notes)
    if result.final_dir is not None:  # main process
        _print_summary(result.output_dir, result.final_dir, result.steps, result.metrics)
    return 0


def _clear_run(out: Path, config: Path) -> None:
    """`--overwrite`: delete `out` and everything in it when it holds a run (a new or unrelated directory is left
    alone), so the run starts from scratch. Never a directory holding the current one or the home directory, nor
    one the config file itself lies in. Under a launcher only rank 0 deletes: the other processes write nothing
    in `out` before the process group forms, and it forms only once rank 0 has deleted."""
    run = RunDir(out)
    if not run.metrics.exists() and not run.config.exists():
        return
    target, here = out.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents or target == Path.home().resolve():
        raise UserError(f"{out} is or holds the current directory (or is the home directory); --overwrite deletes "
                        "the whole run directory", where="--overwrite",
                        fix="pass the run directory itself, e.g. --output runs/my-run, from outside it")
    if target in config.resolve().parents:
        raise UserError(f"the config {config} lies in {out}, which --overwrite deletes", where="--overwrite",
                        fix=f"copy the config out of {out} first")
    if _rank() == 0:
        import shutil

        shutil.rmtree(target)


def _rank() -> int:
    """This process's global rank under a launcher (accelerate launch / torchrun set RANK), else 0."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def _launch(argv: list[str]) -> int:
    """`runrl launch [accelerate launch options] train CONFIG [train options]`: accelerate's launcher (run here,
    in this process) on `python -m runrl_engine.cli train ...`. A user error in the processes is printed once, by
    rank 0, and the launcher exits with its status 2 without torch's ChildFailedError report and traceback;
    RUNRL_TRACEBACK=1 shows them. Any other failure: one line naming the process and its exit status, after the
    process's own traceback."""
    if "train" not in argv or argv[:1] in (["-h"], ["--help"]):
        if argv[:1] in (["-h"], ["--help"]):
            print(LAUNCH_USAGE)
            return 0
        raise UserError("no train command", where="runrl launch", fix=LAUNCH_USAGE)
    cut = argv.index("train")
    import logging
    import subprocess
    import traceback

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args([*argv[:cut], "-m", "runrl_engine.cli", *argv[cut:]])
    loud = os.environ.get("RUNRL_TRACEBACK", "") not in ("", "0")
    os.environ[_LAUNCHED] = "1"  # the processes leave a user error to this launcher, which prints it once
    os.environ[_LAUNCHER_PID] = str(os.getpid())  # their parent: they die with it (_die_with_launcher)
    if "--secrets-stdin" in argv[cut:]:
        # torch's launcher gives every process this stdin, so the first to read it would take the secrets from the
        # others: read them once here, and each process gets a copy in its environment (never a file or a command
        # line; each `train` removes it at once)
        os.environ[_SECRETS_ENV] = sys.stdin.read()
    if not loud:  # the agent's "failed (exitcode: 2) local_rank: 0 ..." line; the report below replaces it
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        if loud:
            traceback.print_exc()
        rank, first = exc.get_first_failure()
        # the agent stops at the first failure, so which processes are listed is a race: print the first one's
        user = sorted((f.timestamp, r, f.message) for r, f in exc.failures.items()
                      if f.exitcode == EXIT_USER_ERROR and isinstance(f.message, str) and f.message.startswith("error: "))
        if user:
            print(user[0][2], file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: process {rank} exited with status {first.exitcode} (its output is above; RUNRL_TRACEBACK=1 "
              "shows the launcher's report)", file=sys.stderr)
        # a process killed by signal N (the OOM killer's SIGKILL: -9) exits 128+N, as a shell reports it
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode if first.exitcode < 0 else 1
    except subprocess.CalledProcessError as exc:  # accelerate's one-process launcher; the process printed why
        if loud:
            traceback.print_exc()
        return exc.returncode
    return 0


LAUNCH_USAGE = ("runrl launch [accelerate launch options] train CONFIG [train options], e.g. runrl launch --multi_gpu "
                "--num_processes 2 train configs/quickstart.yaml --output runs/two (the options are accelerate "
                "launch's: accelerate launch --help)")


_LAUNCHED = "RUNRL_LAUNCHED"  # set by `runrl launch` for its processes
_SECRETS_ENV = "RUNRL_LAUNCH_SECRETS"  # `runrl launch ... train --secrets-stdin`: the secrets, for each process
_LAUNCHER_PID = "RUNRL_LAUNCHER_PID"


def _die_with_launcher() -> None:
    """Under `runrl launch`: this process gets SIGKILL when the launcher dies (Linux). torch starts each process in
    a session of its own, so killing the launcher's process group (a cancelled run, a stopped `runrl serve`) would
    otherwise leave them training, and holding their GPUs."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != os.environ.get(_LAUNCHER_PID, str(os.getppid())):  # it died before the prctl
        os._exit(1)


def _report_user_error(exc: UserError) -> None:
    """Print `error: ...` once. Under a launcher (accelerate launch / torchrun) every process fails alike, so only
    global rank 0 prints; each also leaves the message in its elastic error file (TORCHELASTIC_ERROR_FILE), which
    torch's ChildFailedError report shows as the root cause, and which `runrl launch` prints instead (then no
    process prints)."""
    message = f"error: {exc.render()}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    written = False
    if error_file:
        import time

        try:
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
            written = True
        except OSError:
            pass
    if _rank() == 0 and not (written and os.environ.get(_LAUNCHED) == "1"):
        print(message, file=sys.stderr)


def _print_summary(out: Path, final: Path, steps: int, last: dict) -> None:
    summary = {"output_dir": str(out.resolve()), "final_dir": str(final.resolve()), "steps": steps,
               "reward_mean": last.get("reward_mean"), "eval_reward_mean": last.get("eval_reward_mean")}
    print(json.dumps(summary))


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


class Terminated(Exception):
    """SIGTERM during training."""


def _validate(args: argparse.Namespace) -> int:
    from runrl_engine import data

    if args.kind == "prompt":
        report = data.validate_prompt_file(args.file).to_dict()
    elif args.kind == "sft":
        report = data.validate_sft_file(args.file).to_dict()
    else:
        from runrl_engine.sandbox import validate_user_code

        path = Path(args.file)
        if not path.is_file():
            raise UserError("file not found", where=str(path))
        rows = [r.fields for r in data.load_prompts(args.prompts)[:3]] if args.prompts else None
        mode = "environment" if args.kind == "env" else "function"
        report = validate_user_code(path.read_text(encoding="utf-8"), mode=mode, sample_rows=rows,
                                    filename=str(path))
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["valid"] else 1


SERVER_COMMANDS = ("serve", "keys", "runs")  # added by server/cli.py


def build_parser(extend: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    """`runrl` with the engine's commands; `extend(subparsers)` adds more after them (server/cli.py)."""
    from runrl_engine import __version__

    parser = argparse.ArgumentParser(prog="runrl", description="Self-hosted RunRL: RL fine-tuning of language models.")
    parser.add_argument("--version", action="version", version=f"runrl-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run RL training from a YAML config")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--output", metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint, with its stored config (and its "
                        "--set overrides); --set given now changes max_steps and other keys that may change")
    p.add_argument("--overwrite", action="store_true",
                   help="delete --output and everything in it first when it holds an earlier run, and start from "
                        "scratch (not with --resume)")
    p.add_argument("--secrets-stdin", action="store_true",
                   help='read secret keys (e.g. {"hf_token": "...", "reward_secrets": {"JUDGE_API_KEY": "..."}}) '
                        'as one JSON object from stdin, so they are never written to a file or a command line')
    p.set_defaults(func=_train)

    p = sub.add_parser("launch", add_help=False, help="train on several processes: accelerate launch with one-line "
                                                      "errors (runrl launch --help)")
    p.add_argument("launch_args", nargs=argparse.REMAINDER)  # parsed by _launch (main() sends it there)

    p = sub.add_parser("validate", help="check a prompt/SFT file or reward/environment code")
    p.add_argument("kind", choices=["prompt", "reward", "env", "sft"])
    p.add_argument("file")
    p.add_argument("--prompts", metavar="FILE", help="for reward/env: call the code on a few rows of this prompt file")
    p.set_defaults(func=_validate)

    if extend is not None:
        extend(sub)
    return parser


def main(argv: Sequence[str] | None = None, build: Callable[[], argparse.ArgumentParser] = build_parser) -> int:
    """Run one `runrl` command line with the parser `build` makes (the engine's alone by default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # accelerate's options pass through untouched
        func, args = _launch, argv[1:]
    elif build is build_parser and argv[:1] and argv[0] in SERVER_COMMANDS:
        print(f"error: `{argv[0]}` is a command of the server's runrl; run `runrl {argv[0]} ...` (or python -m "
              f"server.cli {argv[0]} ...), not python -m runrl_engine.cli", file=sys.stderr)
        return EXIT_USER_ERROR
    else:
        args = build().parse_args(argv)
        func = args.func
    try:
        return func(args)
    except UserError as exc:
        _report_user_error(exc)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM); sandbox workers stopped and their directories removed", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
