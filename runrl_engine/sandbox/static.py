"""Static checks of user code, without executing it: it compiles, and it defines what its mode needs.

`inspect_user_code` parses the file with `ast` and compiles it (which runs no user code), then looks for the
entry point: `reward_fn` (or the older batch `reward_func`) for reward code, an environment class with `step`
and `setup`/`__init__` for environments. Mistakes raise `UserCodeError` naming file:line:col and the fix.

Not covered: anything that needs running the code (import errors, wrong return types) — `validate_user_code`
does that in the sandbox.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass
from pathlib import Path

from runrl_engine.errors import UserCodeError

_FUNCTION_MODES = ("function", "reward_function", "reward")
_ENV_MODES = ("environment", "env")
REWARD_FIX = "define `def reward_fn(completion, **kwargs)` returning a float or (float, dict)"
BATCH_FIX = "define `def reward_func(prompts, completions, **kwargs)` returning a list of floats"
ENV_FIX = "define `class CustomEnv` with `setup(self, **kwargs)` and `step(self, action)` returning " \
          "{'observation': str, 'reward': float, 'done': bool}"


@dataclass(frozen=True)
class UserCodeInfo:
    """What the static check found. `contract`: reward_fn | messages | batch | environment."""

    filename: str
    mode: str                 # "function" | "environment"
    entry: str                # "reward_fn", "reward_func" or the environment class name
    contract: str
    env_init: str | None      # environment only: "setup" or the older "__init__"
    imports: tuple[str, ...]  # top-level modules imported (packages the workers must be able to import)
    warnings: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _normal_mode(mode: str) -> str:
    if mode in _FUNCTION_MODES:
        return "function"
    if mode in _ENV_MODES:
        return "environment"
    raise ValueError(f"mode must be 'function' or 'environment', not {mode!r}")


def _read(path_or_source: str | Path, filename: str | None) -> tuple[str, str]:
    """A Path (or a one-line str naming an existing .py file) is read; any other str is the source itself."""
    looks_like_path = isinstance(path_or_source, str) and "\n" not in path_or_source \
        and path_or_source.endswith(".py") and Path(path_or_source).is_file()
    if isinstance(path_or_source, Path) or looks_like_path:
        path = Path(path_or_source)
        name = filename or str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserCodeError(f"cannot read the file: {exc.strerror}", where=name) from None
        try:
            return data.decode("utf-8-sig"), name
        except UnicodeDecodeError as exc:
            raise UserCodeError(f"the file is not UTF-8 text (byte {exc.start})", where=name,
                                fix="save the file as UTF-8") from None
    return str(path_or_source), filename or "<user code>"


def _syntax_error(exc: SyntaxError, filename: str) -> UserCodeError:
    line, col = exc.lineno or 0, exc.offset or 0
    message = f"syntax error: {exc.msg}"
    if exc.text:
        text = exc.text.rstrip("\n")
        stripped = text.lstrip()
        caret = " " * max(0, col - 1 - (len(text) - len(stripped)))
        message += f"\n    {stripped}\n    {caret}^"
    return UserCodeError(message, where=f"{filename}:{line}:{col}", fix="fix the syntax; the file must compile "
                         "under this Python")


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Module statements, including those nested in if/try/with (e.g. `try: import x except: ...`)."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body) + _top_level(node.orelse) + _top_level(node.finalbody)
            for handler in node.handlers:
                out += _top_level(handler.body)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            out += _top_level(node.body)
    return out


def _bindings(stmts: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names bound at module level -> the (last) binding statement."""
    names: dict[str, ast.AST] = {}
    for node in stmts:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        names[sub.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def _imports(stmts: list[ast.stmt]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for node in stmts:
        if isinstance(node, ast.Import):
            found.update(dict.fromkeys(a.name.split(".")[0] for a in node.names))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found[node.module.split(".")[0]] = None
    return tuple(found)


def _reads_message_list(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Does the body use the older message-list form, `completion[0]["content"]`?"""
    if not fn.args.args:
        return False
    first = fn.args.args[0].arg
    for node in ast.walk(fn):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Subscript):
            inner = node.value
            if isinstance(inner.value, ast.Name) and inner.value.id == first \
                    and isinstance(node.slice, ast.Constant) and node.slice.value in ("content", "role"):
                return True
    return False


def _check_reward(names: dict[str, ast.AST], filename: str) -> tuple[str, str, list[str]]:
    warnings: list[str] = []
    if "reward_fn" in names:
        entry, positional = "reward_fn", 1
        if "reward_func" in names:
            warnings.append("both reward_fn and reward_func are defined; reward_fn is used")
    elif "reward_func" in names:
        entry, positional = "reward_func", 2
    else:
        hint = ""
        if any(isinstance(n, ast.ClassDef) and n.name == "CustomEnv" for n in names.values()):
            hint = " (this file defines CustomEnv: use it as an environment, type: environment)"
        raise UserCodeError(f"no `reward_fn` function is defined{hint}", where=filename, fix=REWARD_FIX)
    node = names[entry]
    contract = "batch" if entry == "reward_func" else "reward_fn"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args
        n_positional = len(args.posonlyargs) + len(args.args)
        if n_positional < positional and args.vararg is None:
            want = "the completion" if positional == 1 else "prompts and completions"
            raise UserCodeError(f"{entry} must accept {want} as positional argument(s)",
                                where=f"{filename}:{node.lineno}:{node.col_offset + 1}",
                                fix=REWARD_FIX if positional == 1 else BATCH_FIX)
        if args.kwarg is None:
            warnings.append(f"{entry} has no **kwargs: only the prompt-row fields it names as parameters are passed")
        if contract == "reward_fn" and _reads_message_list(node):
            contract = "messages"
    elif isinstance(node, ast.ClassDef):
        warnings.append(f"{entry} is a class; it will be called as reward_fn(completion, **row)")
    return entry, contract, warnings


def _methods(cls: ast.ClassDef, classes: dict[str, ast.ClassDef],
             seen: set[str] | None = None) -> tuple[set[str], bool]:
    """Method names of `cls` including same-file base classes; the flag says a base class is defined elsewhere."""
    seen = seen or set()
    names = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    foreign = False
    for base in cls.bases:
        base_name = base.id if isinstance(base, ast.Name) else None
        if base_name in classes and base_name not in seen:
            seen.add(base_name)
            more, more_foreign = _methods(classes[base_name], classes, seen)
            names |= more
            foreign |= more_foreign
        elif base_name != "object":
            foreign = True
    return names, foreign


def _check_environment(stmts: list[ast.stmt], filename: str) -> tuple[str, str, list[str]]:
    classes = {n.name: n for n in stmts if isinstance(n, ast.ClassDef)}
    warnings: list[str] = []
    candidates: list[tuple[str, str]] = []
    for name, cls in classes.items():
        methods, foreign = _methods(cls, classes)
        if "step" in methods:
            candidates.append((name, "setup" if "setup" in methods else "__init__"))
        elif name == "CustomEnv" and foreign:
            warnings.append("CustomEnv inherits step() from a class defined elsewhere; not checked statically")
            candidates.append((name, "setup"))
        elif name == "CustomEnv":
            raise UserCodeError("class CustomEnv has no step(self, action) method",
                                where=f"{filename}:{cls.lineno}:{cls.col_offset + 1}", fix=ENV_FIX)
    if not candidates:
        raise UserCodeError("no environment class is defined", where=filename, fix=ENV_FIX)
    chosen = next((c for c in candidates if c[0] == "CustomEnv"), candidates[0])
    if len(candidates) > 1 and chosen[0] != "CustomEnv":
        warnings.append(f"several classes define step(); using {chosen[0]} (name it CustomEnv to choose)")
    if chosen[1] == "__init__":
        warnings.append(f"{chosen[0]} has no setup(); the older __init__(**row) form is used")
    return chosen[0], chosen[1], warnings


def inspect_user_code(path_or_source: str | Path, *, mode: str = "function",
                      filename: str | None = None) -> UserCodeInfo:
    """Check user code without running it. Raises `UserCodeError` (file:line:col, message, fix)."""
    mode = _normal_mode(mode)
    source, name = _read(path_or_source, filename)
    if not source.strip():
        raise UserCodeError("the file is empty", where=name, fix=REWARD_FIX if mode == "function" else ENV_FIX)
    try:
        tree = ast.parse(source, filename=name)
        compile(tree, name, "exec", dont_inherit=True)  # symbol-table errors (e.g. misplaced nonlocal); runs nothing
    except SyntaxError as exc:
        raise _syntax_error(exc, name) from None
    except ValueError as exc:  # e.g. NUL bytes
        raise UserCodeError(f"the file cannot be compiled: {exc}", where=name) from None
    stmts = _top_level(tree.body)
    if mode == "function":
        entry, contract, warnings = _check_reward(_bindings(stmts), name)
        env_init = None
    else:
        entry, env_init, warnings = _check_environment(stmts, name)
        contract = "environment"
    return UserCodeInfo(filename=name, mode=mode, entry=entry, contract=contract, env_init=env_init,
                        imports=_imports(stmts), warnings=tuple(warnings))
