"""`runrl`: train, validate, serve, keys.

User mistakes (`UserError`) print one message naming the file/line/key and the fix, and exit with status 2;
no traceback. Engine bugs keep their traceback. `serve` and `keys` live in the `server` package and are
imported only when used, so `runrl train` never pays for the web stack.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from runrl_engine.errors import UserError

EXIT_USER_ERROR = 2


def _train(args: argparse.Namespace) -> int:
    from runrl_engine.config import load_config

    secrets = None
    if args.secrets_stdin:
        try:
            secrets = json.loads(sys.stdin.read() or "{}")
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
    if not args.resume and (out / "metrics.jsonl").exists():
        raise UserError(f"{out} already holds a run", where="--output",
                        fix="pass --resume to continue it, or choose another --output directory")
    notes: list[str] = []
    if args.resume and (out / "config.yaml").is_file():
        # the run's own config (its first --set overrides included) is what continues; the YAML given now only
        # brings the secrets config.yaml holds redacted, and this invocation's --set are the changes
        from runrl_engine.config import resume_config

        cfg, notes = resume_config(out / "config.yaml", cfg, args.set or [], source=args.config)
    if args.resume:  # refusals and "nothing to do" answered before torch is imported (the trainer checks again)
        from runrl_engine import checkpoint

        point = checkpoint.resume_point(out, cfg)
        if point is not None and point.complete:
            main = int(os.environ.get("RANK", "0")) == 0  # accelerate launch / torchrun set RANK
            last = checkpoint.announce_complete(point, main=main)
            if main:
                _print_summary(out, out / "final", point.step, last)
            return 0
    from runrl_engine.trainer import Trainer

    result = Trainer(cfg, out, resume=args.resume, notes=notes).run()
    if result.final_dir is not None:  # main process
        _print_summary(result.output_dir, result.final_dir, result.steps, result.metrics)
    return 0


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


def _serve(args: argparse.Namespace) -> int:
    from runrl_engine.netpolicy import parse_destination
    from server.cli import serve

    for entry in args.allow_destination or ():
        try:
            parse_destination(entry)
        except ValueError as exc:
            raise UserError(str(exc), where=f"--allow-destination {entry}",
                            fix="write host:port, host, an IP or a CIDR, e.g. 127.0.0.1:8765") from None

    serve(host=args.host, port=args.port, data_dir=args.data_dir, slots=args.slots,
          trusted_proxies=args.trusted_proxy or (), require_isolation=not args.allow_unisolated,
          allow_user_network=args.allow_user_network, allow_url_requirements=args.allow_url_requirements,
          allow_private_destinations=args.allow_private_destinations,
          allowed_destinations=tuple(args.allow_destination or ()), validation_workers=args.validation_workers,
          validation_per_user=args.validation_per_user)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from server.cli import create_key

    token = create_key(name=args.name, scopes=[s.strip() for s in args.scopes.split(",") if s.strip()],
                       user=args.user, data_dir=args.data_dir)
    print(token)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runrl", description="Self-hosted RunRL: RL fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run RL training from a YAML config")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--output", metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint, with its stored config (and its "
                        "--set overrides); --set given now changes max_steps and other keys that may change")
    p.add_argument("--secrets-stdin", action="store_true",
                   help='read secret keys (e.g. {"hf_token": "..."}) as one JSON object from stdin, so they are '
                        'never written to a file or a command line')
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check a prompt/SFT file or reward/environment code")
    p.add_argument("kind", choices=["prompt", "reward", "env", "sft"])
    p.add_argument("file")
    p.add_argument("--prompts", metavar="FILE", help="for reward/env: call the code on a few rows of this prompt file")
    p.set_defaults(func=_validate)

    p = sub.add_parser("serve", help="serve RunRL's REST API from this machine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=str(Path.home() / ".runrl"))
    p.add_argument("--slots", type=int, default=None, help="concurrent training runs (default: one per GPU, else 1)")
    policy = p.add_argument_group("security policy (the defaults are the safe ones)")
    policy.add_argument("--allow-unisolated", action="store_true",
                        help="run user code even where bubblewrap cannot start (then it is NOT isolated: it can "
                             "read what the server's user can read); default: refuse such runs and validations")
    policy.add_argument("--allow-user-network", action="store_true",
                        help="let runs set reward_allow_network: true (user code then reaches the network only "
                             "through an egress proxy that applies the destination policy below); default: user "
                             "code has no network")
    policy.add_argument("--allow-url-requirements", action="store_true",
                        help="accept `name @ https://...` entries in package_requirements; default: index names only")
    policy.add_argument("--allow-private-destinations", action="store_true",
                        help="let MCP tools (test-mcp, run tools), user code's network and pip builds reach "
                             "loopback, private and link-local addresses")
    policy.add_argument("--allow-destination", action="append", metavar="HOST[:PORT]|CIDR",
                        help="allow one non-public destination (MCP tools, user code, pip's index), e.g. "
                             "127.0.0.1:8765 or pypi.internal (repeatable)")
    policy.add_argument("--validation-workers", type=int, default=4, help="concurrent code validations (default 4)")
    policy.add_argument("--validation-per-user", type=int, default=2,
                        help="concurrent code validations per user (default 2)")
    policy.add_argument("--trusted-proxy", action="append", metavar="IP",
                        help="a reverse proxy whose X-Forwarded-For is believed (repeatable; default none)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("keys", help="manage API keys")
    ks = p.add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="create an API key and print it")
    kc.add_argument("--name", required=True)
    kc.add_argument("--scopes", default="read,write", help="comma-separated: read,write[,admin]")
    kc.add_argument("--user", default="admin", help="user the key belongs to (created on first use)")
    kc.add_argument("--data-dir", default=str(Path.home() / ".runrl"))
    kc.set_defaults(func=_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM); sandbox workers stopped and their directories removed", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
