"""Worker process that runs untrusted user code (reward functions, environments) for the sandbox.

Started by `runrl_engine.sandbox` as `python -s _worker.py CONFIG_JSON` (inside bubblewrap where available) and
never imported by the trainer. It is a standalone script: stdlib only, no `runrl_engine` import, so it starts in
tens of milliseconds and never pulls in torch.

Protocol: one JSON object per line. Requests arrive on the original stdin, replies leave on the original
stdout; both are moved to private descriptors before user code runs, so `print()` in user code goes to stderr
and `input()` reads /dev/null. Every request is `{"op": ..., ...}`:

- `load {source, filename, kind, concurrency, sync_threads, timeout_s, env}` -> `ready {contract, entry,
  concurrency}` or `load_error {error}`; `env` (the run's `reward_secrets`) is set in `os.environ` first, then
  the module is executed once; `concurrency` in `ready` is what applies to the loaded code (see `RewardRunner`).
- `score {items: [{idx, completion, row}], batch}` -> one `result {idx, reward, info, error[, timeout]}` line per
  item, in order, as soon as each is known (the parent times each item from the previous line); `timeout: true`
  marks a call this worker timed out itself (concurrent calls only).
- `env_create {idx, row}`, `env_step {idx, action}`, `env_close {idx}` -> one `env_result` line each
  (one environment instance per rollout, kept in this process).
- `retire {reason}` is sent unasked when the CPU-time budget is nearly spent (`cpu`), or after a call in a thread
  timed out and cannot be stopped (`timeout`); the worker then exits.

This file does not enforce isolation: the parent picks the launcher (bubblewrap or a plain subprocess) and
the environment; here we only set the resource limits on ourselves before any user code runs. With `egress`
in the config (a filtered network), we also start a forwarder from 127.0.0.1:<port> in the sandbox's own
network namespace to the parent's egress proxy (`egress.py`, which applies the destination policy).
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import resource
import signal
import sys
import types
from typing import Any, Callable

_THIS_FILE = os.path.abspath(__file__)
_DUMMY_USER_MODULE = "user_code"
_MAX_INFO_STR = 2000


# ----------------------------------------------------------------------------------------------- limits


def _set_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)  # an unprivileged process cannot raise its hard limit; keep the lower one
    resource.setrlimit(which, (value, value))


def _apply_limits(limits: dict[str, Any]) -> None:
    mb = 1024 * 1024
    if limits.get("data_mb"):
        # RLIMIT_DATA counts private writable mappings (heap, anonymous mmap): close to "memory used" without
        # failing on the large *reserved* address ranges that threads and allocators create (RLIMIT_AS would).
        _set_limit(resource.RLIMIT_DATA, int(limits["data_mb"]) * mb)
    if limits.get("cpu_s"):
        _set_limit(resource.RLIMIT_CPU, max(1, math.ceil(limits["cpu_s"])))  # SIGXCPU kills at the limit
    if limits.get("fsize_mb"):
        _set_limit(resource.RLIMIT_FSIZE, int(limits["fsize_mb"]) * mb)
    if limits.get("nproc"):
        _set_limit(resource.RLIMIT_NPROC, int(limits["nproc"]))
    _set_limit(resource.RLIMIT_CORE, 0)  # a core dump of user code is disk use nobody asked for


# --------------------------------------------------------------------------------------------- protocol


class _Channel:
    """Line-delimited JSON over two private file descriptors."""

    def __init__(self, fd_in: int, fd_out: int):
        self._in = os.fdopen(fd_in, "rb", buffering=1 << 16)
        self._out = fd_out

    def recv(self) -> dict[str, Any] | None:
        line = self._in.readline()
        if not line:
            return None
        return json.loads(line)

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        while data:
            n = os.write(self._out, data)
            data = data[n:]


def _claim_stdio() -> _Channel:
    """Move the protocol to private fds; user code gets /dev/null as stdin and stderr as stdout."""
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    return _Channel(proto_in, proto_out)


# ------------------------------------------------------------------------------------------ user values


class _FirstChar(str):
    """`completion[0]` / `completion[-1]`: the character, and also the single assistant message.

    The older RunRL contract passed `[{"role": "assistant", "content": text}]`; code written for it reads
    `completion[0]["content"]`. Indexing this with a string key answers like that message dict, while every
    str operation (`== "A"`, `.isupper()`) still sees the character, so new-style code is unaffected.
    """

    _message: dict[str, str]

    def __new__(cls, char: str, text: str) -> "_FirstChar":
        self = super().__new__(cls, char)
        self._message = {"role": "assistant", "content": text}
        return self

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return self._message[key]
        return str.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self._message.get(key, default)

    def keys(self) -> Any:
        return self._message.keys()

    def items(self) -> Any:
        return self._message.items()

    def values(self) -> Any:
        return self._message.values()


class Completion(str):
    """The completion text, compatible with the message-list form (see `_FirstChar`)."""

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if type(key) is int and key in (0, -1):
            text = str(self)
            return _FirstChar(text[key] if text else "", text)
        return str.__getitem__(self, key)


# Rewards beyond this are refused (the parent checks again: pool.MAX_ABS_REWARD): float32 tensors, group
# statistics and losses of larger values overflow.
_MAX_ABS_REWARD = 1e15


def _to_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes, bytearray)) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _clean_info(raw: Any) -> dict[str, float | str]:
    info: dict[str, float | str] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            clean: float | str = _text(value[:_MAX_INFO_STR])
        else:
            number = None if isinstance(value, (bytes, bytearray)) else _to_float(value)
            if number is not None and math.isfinite(number):
                clean = number
            else:  # NaN would poison a per-step average; keep it visible as text instead
                clean = _text(str(value)[:_MAX_INFO_STR])
        info[_text(str(key))] = clean
    return info


def _normalise(out: Any, what: str) -> dict[str, Any]:
    """User return value -> {reward, info, error}; anything unusable scores 0 with an error."""
    raw_info: Any = {}
    value = out
    if isinstance(out, (tuple, list)) and len(out) == 2 and not isinstance(out[1], (int, float)):
        value, raw_info = out
        raw_info = {} if raw_info is None else raw_info
        if not hasattr(raw_info, "items"):
            return _error(f"{what} returned a pair whose second element is {type(raw_info).__name__}, not a dict")
    number = _to_float(value)
    if number is None:
        try:
            shown = _text(repr(value)[:200])
        except Exception:
            shown = "(unprintable)"
        return _error(f"{what} returned {type(value).__name__} {shown}; expected a number or (number, dict)")
    if not math.isfinite(number):
        return _error(f"{what} returned {number}; rewards must be finite numbers")
    if abs(number) > _MAX_ABS_REWARD:
        return _error(f"{what} returned {number:g}; rewards must lie within ±{_MAX_ABS_REWARD:g}")
    try:
        info = _clean_info(raw_info)
    except Exception as exc:  # a broken __str__ or a dict-like that fails on .items()
        return _error(f"{what} returned an info dict that could not be read: {exc!r}")
    return {"reward": number, "info": info, "error": None}


def _error(message: str) -> dict[str, Any]:
    return {"reward": 0.0, "info": {}, "error": message}


def _describe_exception(exc: BaseException, what: str) -> str:
    import traceback  # only on the error path: keeps start-up light

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
        tb = tb.tb_next  # show the user's frames, not the harness
    try:
        head = f"{what} raised {type(exc).__name__}: {exc}"[:500]
        body = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # an exception whose __str__ itself fails
        head, body = f"{what} raised {type(exc).__name__}", "".join(traceback.format_tb(tb))
    return _text(head + "\n" + body)


def _text(value: str) -> str:
    """Plain, UTF-8-encodable str: lone surrogates would break the trainer's log and JSONL writers."""
    return str.__str__(value).encode("utf-8", "replace").decode("utf-8")


_LOOP: Any = None  # this worker's one event loop, made at the first awaitable and kept for its lifetime


def _event_loop() -> Any:
    """The worker's event loop. One loop for every call (not `asyncio.run` per call), so what user code keeps
    across calls (an `httpx.AsyncClient`, an `openai.AsyncOpenAI`, a connection pool) stays bound to a live loop."""
    global _LOOP
    if _LOOP is None:
        import asyncio

        _LOOP = asyncio.new_event_loop()
        asyncio.set_event_loop(_LOOP)
    return _LOOP


def _await_if_needed(value: Any) -> Any:
    if hasattr(value, "__await__") and hasattr(value, "send"):
        return _event_loop().run_until_complete(value)
    return value


# --------------------------------------------------------------------------------------------- calling


class _KwargFilter:
    """Pass every row field, or only the named parameters when the function has no `**kwargs`."""

    def __init__(self, fn: Callable[..., Any], positional: int):
        code = getattr(fn, "__code__", None)
        if code is None and hasattr(fn, "__call__"):
            code = getattr(getattr(fn, "__call__", None), "__code__", None)
            positional += 1 if code is not None else 0  # bound __call__: skip `self`
        self.accept_all = code is None or bool(code.co_flags & 0x08)  # CO_VARKEYWORDS
        self.positional_names: tuple[str, ...] = ()
        self.names: frozenset[str] = frozenset()
        if code is not None:
            arg_names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            self.positional_names = tuple(arg_names[:positional])
            self.names = frozenset(arg_names[positional:])

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.accept_all:
            return {k: v for k, v in row.items() if k not in self.positional_names}
        return {k: v for k, v in row.items() if k in self.names}


def _is_async_function(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class RewardRunner:
    """Calls `reward_fn(completion, **row)` or the batch `reward_func(prompts, completions, **columns)`.

    `concurrency` > 1 (RunConfig `reward_concurrency`) lets an `async def reward_fn` have that many calls in
    flight on this worker's event loop, and, with `sync_threads` (`reward_sync_threads`), a plain `def
    reward_fn` run in that many threads; `self.concurrency` is what applies (1 for the batch form and for sync
    functions without `sync_threads`). Concurrent calls are timed here, each from its own start (`timeout_s`):
    a late coroutine is cancelled; a late thread cannot be stopped, so this worker starts no more calls,
    answers the ones running and retires (the parent starts a replacement and resends what is unanswered)."""

    def __init__(self, module: types.ModuleType, concurrency: int = 1, sync_threads: bool = False,
                 timeout_s: float = 0.0):
        self.timeout_s, self.threads, self.stuck = float(timeout_s), False, False
        self.concurrency = 1
        fn = getattr(module, "reward_fn", None)
        if callable(fn):
            self.contract, self.entry, self.fn = "reward_fn", "reward_fn", fn
            self.kwargs = _KwargFilter(fn, 1)
            self.is_async = _is_async_function(fn)
            if concurrency > 1 and self.timeout_s > 0 and (self.is_async or sync_threads):
                self.concurrency = int(concurrency)
                self.threads = not self.is_async
            return
        fn = getattr(module, "reward_func", None)
        if callable(fn):
            self.contract, self.entry, self.fn = "batch", "reward_func", fn
            self.kwargs = _KwargFilter(fn, 2)
            return
        raise LookupError("the file defines no callable `reward_fn`; define `def reward_fn(completion, **kwargs)`")

    def one(self, item: dict[str, Any]) -> dict[str, Any]:
        try:
            out = self.fn(Completion(item["completion"]), **self.kwargs(item["row"]))
            return _normalise(_await_if_needed(out), "reward_fn")
        except BaseException as exc:  # SystemExit/KeyboardInterrupt from user code must not end the worker
            return _error(_describe_exception(exc, "reward_fn"))

    async def one_async(self, item: dict[str, Any], threads: Any, where: dict[str, int]) -> dict[str, Any]:
        """`one()` for the concurrent path: awaited on the worker's loop, a sync function run in `threads`."""
        import asyncio
        import threading

        try:
            completion, kwargs = Completion(item["completion"]), self.kwargs(item["row"])
            if self.threads:
                def call() -> Any:
                    where["thread"] = threading.get_ident()  # where a late call is stuck, for its error
                    return self.fn(completion, **kwargs)

                out = await asyncio.get_running_loop().run_in_executor(threads, call)
            else:
                out = self.fn(completion, **kwargs)
            if hasattr(out, "__await__"):
                out = await out
            return _normalise(out, "reward_fn")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # SystemExit/KeyboardInterrupt from user code must not end the worker
            return _error(_describe_exception(exc, "reward_fn"))

    def batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Raises on a user exception so the caller can retry item by item."""
        rows = [it["row"] for it in items]
        prompts = [row.get("prompt", row.get("messages")) for row in rows]
        completions = [[{"role": "assistant", "content": Completion(it["completion"])}] for it in items]
        keys: dict[str, None] = {}
        for row in rows:
            keys.update(dict.fromkeys(row))
        keys.pop("prompt", None)
        columns = {k: [row.get(k) for row in rows] for k in keys}
        out = _await_if_needed(self.fn(prompts, completions, **self.kwargs(columns)))
        if not isinstance(out, (list, tuple)) or len(out) != len(items):
            got = f"{type(out).__name__} of length {len(out)}" if hasattr(out, "__len__") else type(out).__name__
            raise TypeError(f"reward_func must return a list of {len(items)} numbers, got {got}")
        return [
            _error("reward_func returned None for this item") if v is None else _normalise(v, "reward_func")
            for v in out
        ]


class EnvRunner:
    """Holds one user environment instance per rollout (`idx`), created with `setup(**row)` or `__init__(**row)`."""

    def __init__(self, module: types.ModuleType, class_name: str | None):
        cls = getattr(module, class_name, None) if class_name else None
        if cls is None:
            cls = getattr(module, "CustomEnv", None)
        if not isinstance(cls, type):
            candidates = [v for v in vars(module).values()
                          if isinstance(v, type) and callable(getattr(v, "step", None))]
            cls = candidates[0] if candidates else None
        if cls is None or not callable(getattr(cls, "step", None)):
            raise LookupError("the file defines no environment class; define `class CustomEnv` with setup() and step()")
        self.cls = cls
        self.contract = "environment"
        self.entry = cls.__name__
        self.has_setup = callable(getattr(cls, "setup", None))
        target = cls.setup if self.has_setup else cls.__init__
        self.kwargs = _KwargFilter(target, 1)  # skip `self`
        self.envs: dict[int, Any] = {}

    def create(self, idx: int, row: dict[str, Any]) -> dict[str, Any]:
        try:
            if self.has_setup:
                env = self.cls()
                first = env.setup(**self.kwargs(row))
            else:
                env = self.cls(**self.kwargs(row))
                first = None
        except BaseException as exc:
            return {"error": _describe_exception(exc, f"{self.entry}.setup")}
        self.envs[idx] = env
        # The stateful-MCP tutorial's setup() returns the first observation; the documented one returns None.
        observation = _text(first) if isinstance(first, str) else None
        return {"error": None, "observation": observation}

    def step(self, idx: int, action: str) -> dict[str, Any]:
        env = self.envs.get(idx)
        if env is None:
            return {"error": f"no environment {idx} (it failed or was closed)", "reward": 0.0, "done": True}
        try:
            reply = self._parse_step(_await_if_needed(env.step(Completion(action))))
        except BaseException as exc:  # also a return value whose str()/bool() raises
            reply = {"error": _describe_exception(exc, f"{self.entry}.step"), "reward": 0.0, "done": True}
        if reply["error"] is not None:
            self.envs.pop(idx, None)  # the episode is over; later calls say so
        return reply

    def _parse_step(self, out: Any) -> dict[str, Any]:
        what = f"{self.entry}.step"
        if isinstance(out, dict):
            observation, reward, done = out.get("observation"), out.get("reward"), out.get("done")
            raw_info = out.get("reward_info_dict") or out.get("info") or {}
        elif isinstance(out, (tuple, list)) and len(out) in (3, 4):
            observation, reward, done = out[0], out[1], out[2]
            raw_info = out[3] if len(out) == 4 and out[3] is not None else {}
        else:
            return {"error": f"{what} returned {type(out).__name__}; expected a dict with observation, reward, done",
                    "reward": 0.0, "done": True}
        scored = _normalise((reward, raw_info if hasattr(raw_info, "items") else {}), what)
        if scored["error"] is not None:
            return {"error": scored["error"], "reward": 0.0, "done": True}
        return {"error": None, "observation": "" if observation is None else _text(str(observation)),
                "reward": scored["reward"], "done": bool(done), "info": scored["info"]}

    def close(self, idx: int) -> None:
        env = self.envs.pop(idx, None)
        close = getattr(env, "close", None)
        if callable(close):
            try:
                close()
            except BaseException:
                pass  # a failing close() must not cost the rollout its reward


# ------------------------------------------------------------------------------------------------ loop


def _load(msg: dict[str, Any]) -> types.ModuleType:
    module = types.ModuleType(_DUMMY_USER_MODULE)
    module.__file__ = msg["filename"]
    sys.modules[_DUMMY_USER_MODULE] = module  # dataclasses/pickle inside user code look themselves up here
    code = compile(msg["source"], msg["filename"], "exec", dont_inherit=True)
    import linecache  # tracebacks show the user's lines (the file itself is not mounted in the sandbox)

    linecache.cache[msg["filename"]] = (len(msg["source"]), None, msg["source"].splitlines(True), msg["filename"])
    exec(code, module.__dict__)
    return module


def _cpu_spent() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime  # what RLIMIT_CPU counts


class _CpuBudget:
    """Retire before RLIMIT_CPU kills us mid-call: when 80% is spent, or when the dearest call so far (x1.5)
    would not fit in what is left. The parent then starts a fresh worker and resends what is unanswered."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self.dearest = 0.0
        self.mark = _cpu_spent()

    def near_limit(self) -> bool:
        if not self.limit_s:
            return False
        spent = _cpu_spent()
        self.dearest = max(self.dearest, spent - self.mark)
        self.mark = spent
        return spent > 0.8 * self.limit_s or spent + 1.5 * self.dearest > self.limit_s


def _serve(chan: _Channel, config: dict[str, Any]) -> None:
    runner: RewardRunner | EnvRunner | None = None
    budget = _CpuBudget(float(config.get("limits", {}).get("cpu_s") or 0))
    near_limit = budget.near_limit
    while True:
        msg = chan.recv()
        if msg is None or msg.get("op") == "exit":
            return
        op = msg.get("op")
        if op == "load":
            try:
                # reward_secrets: the run's secrets for this code, in its environment only (never on a command
                # line, in a file or in the worker's initial environment, which /proc/<pid>/environ shows)
                os.environ.update({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
                module = _load(msg)
                budget.mark = _cpu_spent()  # the module's import is not a call
                if msg.get("kind") == "environment":
                    runner = EnvRunner(module, msg.get("entry"))
                else:
                    runner = RewardRunner(module, int(msg.get("concurrency") or 1), bool(msg.get("sync_threads")),
                                          float(msg.get("timeout_s") or 0))
            except BaseException as exc:
                chan.send({"op": "load_error", "error": _describe_exception(exc, "loading the user code")})
                return
            chan.send({"op": "ready", "contract": runner.contract, "entry": runner.entry, "pid": os.getpid(),
                       "concurrency": getattr(runner, "concurrency", 1)})
        elif op == "score" and isinstance(runner, RewardRunner):
            if not _score(chan, runner, msg, near_limit):
                chan.send({"op": "retire", "reason": "timeout" if runner.stuck else "cpu"})
                if runner.stuck:  # a thread still runs user code: exit without joining it
                    sys.stdout.flush()
                    os._exit(0)
                return
        elif op in ("env_create", "env_step", "env_close") and isinstance(runner, EnvRunner):
            if op == "env_create":
                reply = runner.create(msg["idx"], msg.get("row") or {})
            elif op == "env_step":
                reply = runner.step(msg["idx"], msg.get("action", ""))
            else:
                runner.close(msg["idx"])
                reply = {"error": None}
            chan.send({"op": "env_result", "idx": msg["idx"], **reply})
        else:
            chan.send({"op": "protocol_error", "error": f"unexpected request {op!r}"})
            return
        if near_limit():
            chan.send({"op": "retire"})
            return


def _score(chan: _Channel, runner: RewardRunner, msg: dict[str, Any], near_limit: Callable[[], bool]) -> bool:
    """Answer every item of the request; False means "retire now" (the parent resends unanswered items)."""
    items = msg["items"]
    if runner.concurrency > 1:
        return _event_loop().run_until_complete(_score_concurrently(chan, runner, items, near_limit))
    if msg.get("batch") and runner.contract == "batch":
        try:
            outs = runner.batch(items)
        except BaseException:
            chan.send({"op": "progress"})  # the parent restarts this call's clock for the item-by-item retry
        else:
            for item, out in zip(items, outs):
                chan.send({"op": "result", "idx": item["idx"], **out})
            return not near_limit()
    for item in items:
        if runner.contract == "batch":
            try:
                out = runner.batch([item])[0]
            except BaseException as exc:
                out = _error(_describe_exception(exc, "reward_func"))
        else:
            out = runner.one(item)
        chan.send({"op": "result", "idx": item["idx"], **out})
        if near_limit():
            return False
    return True


_THREADS: Any = None  # the thread pool of `reward_sync_threads`, made at the first concurrent sync call


async def _score_concurrently(chan: _Channel, runner: RewardRunner, items: list[dict[str, Any]],
                              near_limit: Callable[[], bool]) -> bool:
    """Up to `runner.concurrency` calls in flight; results sent in item order, each as soon as it and every
    earlier one is known (the parent times each answer from the previous one, so an in-order answer comes at
    most one `timeout_s` after the last). Each call is timed from its own start: a late one answers "timed out"
    (and counts as a timeout in the parent). False: retire after this request (CPU budget, or a thread that
    timed out and cannot be stopped); the calls already started are answered first."""
    import asyncio

    global _THREADS
    if runner.threads and _THREADS is None:
        from concurrent.futures import ThreadPoolExecutor

        _THREADS = ThreadPoolExecutor(runner.concurrency, thread_name_prefix="reward_fn")
    loop = asyncio.get_running_loop()
    running: dict[Any, tuple[int, float, dict[str, int]]] = {}  # task -> (position, start, where it runs)
    done: dict[int, dict[str, Any]] = {}
    started = sent = 0
    stop = False
    while sent < len(items):
        while not stop and started < len(items) and len(running) < runner.concurrency:
            where: dict[str, int] = {}
            task = loop.create_task(runner.one_async(items[started], _THREADS, where))
            running[task] = (started, loop.time(), where)
            started += 1
        if not running:
            break
        first_deadline = min(start for _, start, _ in running.values()) + runner.timeout_s
        await asyncio.wait(list(running), timeout=max(0.0, first_deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
        now = loop.time()
        for task, (position, start, where) in list(running.items()):
            if task.cancelled():  # user code raised CancelledError itself (ours are settled below)
                done[position] = _error("reward_fn raised CancelledError")
            elif task.done():
                done[position] = task.result()  # one_async turns every other user failure into an error result
            elif now - start >= runner.timeout_s:
                done[position] = _timed_out(runner, task, where)
                task.cancel()
                stop = stop or runner.threads  # the thread runs on: no more calls here
            else:
                continue
            del running[task]
        while sent in done:
            chan.send({"op": "result", "idx": items[sent]["idx"], **done.pop(sent)})
            sent += 1
        if near_limit():
            stop = True
    return not stop


def _timed_out(runner: RewardRunner, task: Any, where: dict[str, int]) -> dict[str, Any]:
    """The error of a call that ran past `timeout_s`, with the user frames it was in."""
    import traceback

    frames: list[Any] = []
    if runner.threads:
        runner.stuck = True
        frame = sys._current_frames().get(where.get("thread", -1))
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        frames.reverse()
        what = "the thread cannot be stopped: this worker takes no more calls and is replaced"
    else:
        coro = task.get_coro()
        while coro is not None:  # the chain of awaits, outermost first
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                frames.append(frame)
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        what = "the call was cancelled"
    user = [(f, f.f_lineno) for f in frames if f.f_code.co_filename != _THIS_FILE]
    stack = "".join(traceback.StackSummary.extract(user, lookup_lines=True).format()) if user else ""
    text = f"timed out after {runner.timeout_s:g} s ({what})"
    return {**_error(_text(text + (f"\nwhere it was:\n{stack}" if stack else ""))), "timeout": True}


# ------------------------------------------------------------------------------------------------ egress


def _start_egress_forwarder(socket_path: str, port: int) -> None:
    """Listen on 127.0.0.1:`port` (this sandbox's own loopback) and relay every connection to the parent's egress
    proxy on the Unix socket `socket_path`. The proxy enforces the destination policy; this only carries bytes.
    One thread with a selector (thread stacks count against RLIMIT_DATA), at most 64 connections."""
    import socket
    import threading

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))  # before user code loads: its first request finds the port listening
    listener.listen(64)
    listener.setblocking(False)
    old = threading.stack_size(256 << 10)
    try:
        threading.Thread(target=_forward, args=(listener, socket_path), name="runrl-egress-forwarder",
                         daemon=True).start()
    finally:
        threading.stack_size(old)


class _Leg:
    """One socket of a relayed pair: `out` holds bytes waiting to be written to it."""

    __slots__ = ("sock", "peer", "out", "reading", "shut", "events")

    def __init__(self, sock: Any):
        self.sock, self.peer, self.out = sock, None, bytearray()
        self.reading, self.shut, self.events = True, False, 0


def _forward(listener: Any, socket_path: str) -> None:
    import selectors
    import socket

    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    pairs = 0

    def drop(leg: _Leg) -> None:
        nonlocal pairs
        for one in (leg, leg.peer):
            if one.events:
                sel.unregister(one.sock)
                one.events = 0
            one.sock.close()
        pairs -= 1

    def update(leg: _Leg) -> bool:
        """Half-close and re-register both legs; False when the pair is finished (then dropped)."""
        for one in (leg, leg.peer):
            if not one.peer.reading and not one.out and not one.shut:
                one.shut = True
                try:
                    one.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    drop(leg)
                    return False
        if leg.shut and leg.peer.shut:
            drop(leg)
            return False
        for one in (leg, leg.peer):
            events = (selectors.EVENT_READ if one.reading and len(one.peer.out) < (1 << 18) else 0) | \
                     (selectors.EVENT_WRITE if one.out else 0)
            if events != one.events:
                if not events:
                    sel.unregister(one.sock)
                elif one.events:
                    sel.modify(one.sock, events, one)
                else:
                    sel.register(one.sock, events, one)
                one.events = events
        return True

    while True:
        for key, events in sel.select():
            leg = key.data
            if leg is None:
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    if pairs >= 64:
                        raise OSError("too many connections")
                    upstream.connect(socket_path)  # a local socket: connects at once or fails
                except OSError:
                    client.close()
                    upstream.close()
                    continue
                client.setblocking(False)
                upstream.setblocking(False)
                a, b = _Leg(client), _Leg(upstream)
                a.peer, b.peer = b, a
                pairs += 1
                update(a)
                continue
            if leg.events == 0:  # dropped earlier in this round
                continue
            try:
                if events & selectors.EVENT_WRITE:
                    try:
                        del leg.out[:leg.sock.send(leg.out)]
                    except BlockingIOError:
                        pass
                if events & selectors.EVENT_READ:
                    try:
                        data = leg.sock.recv(1 << 16)
                    except BlockingIOError:
                        data = None
                    if data:
                        leg.peer.out += data
                    elif data is not None:
                        leg.reading = False
            except OSError:
                drop(leg)
                continue
            update(leg)


def _run_pip(args: list[str]) -> None:
    import runpy

    sys.argv = ["pip", *args]
    runpy.run_module("pip", run_name="__main__", alter_sys=True)


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass  # not Linux/glibc: a worker then exits at EOF on stdin instead


def main() -> None:
    config = json.loads(sys.argv[1])
    if config.get("die_with_parent"):
        _die_with_parent()
    _apply_limits(config.get("limits", {}))
    egress = config.get("egress")
    if egress:
        _start_egress_forwarder(egress["socket"], int(egress["port"]))
    if config.get("role") == "pip":
        _run_pip(sys.argv[2:])
        return
    here = os.path.dirname(_THIS_FILE)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # user `import x` must not find our files
    faulthandler.enable()  # a segfault in user C code leaves its traceback on stderr for the parent to report
    # Before killing a worker that timed out, the parent sends SIGUSR1: the dump says where the code was stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    chan = _claim_stdio()
    _serve(chan, config)


if __name__ == "__main__":
    main()
