"""The engine never imports the server (DESIGN.md), and the `runrl` entry point, which lives in server/cli.py
because it may import both, loads no more than each command needs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WEB = ("starlette", "uvicorn", "httpx")


def server_imports(path: Path) -> list[str]:
    """`import server...` / `from server... import` anywhere in `path` (in a function too), and
    `importlib.import_module("server...")` / `__import__("server...")` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] == "server"]
    return found


def test_no_engine_module_imports_the_server():
    modules = sorted((ROOT / "runrl_engine").rglob("*.py"))
    assert len(modules) > 30  # the whole package is scanned
    found = [hit for path in modules for hit in server_imports(path)]
    assert not found, found


def test_the_scan_sees_an_import_inside_a_function(tmp_path):
    """The engine's cli.py once imported server/cli.py inside its `serve` handler; the scan must see that."""
    probe = tmp_path / "probe.py"
    probe.write_text("def serve():\n    from server.cli import serve\n\n\ndef keys():\n    import importlib\n\n"
                     "    return importlib.import_module('server.cli')\n")
    assert [hit.split(" ")[1] for hit in server_imports(probe)] == ["server.cli", "server.cli"]


def _loaded_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running `code`."""
    report = "\nprint(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code + report], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))


def test_train_through_the_entry_point_loads_no_web_stack_and_no_torch_before_training():
    """Parsing `runrl train ...` with the whole command line (server/cli.py) imports neither the web stack nor
    torch: both wait for the command that needs them."""
    loaded = _loaded_after("from server import cli\nargs = cli.build_parser().parse_args(['train', 'x.yaml'])\n"
                           "assert args.func.__module__ == 'runrl_engine.cli'")
    assert not [m for m in (*WEB, "torch", "transformers") if m in loaded], loaded


def test_the_engine_cli_alone_loads_nothing_of_the_server():
    loaded = _loaded_after("from runrl_engine import cli\ncli.build_parser().parse_args(['validate', 'prompt', 'x'])")
    assert "server" not in loaded and not [m for m in (*WEB, "torch") if m in loaded], loaded


def test_the_engine_cli_points_server_commands_to_the_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runrl_engine.cli", "serve", "--port", "1"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "python -m server.cli serve" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_entry_point_is_server_cli():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts == {"runrl": "server.cli:main"}
