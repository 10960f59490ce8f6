"""Deployments: serve a finished run's `final/` model with OpenAI-compatible chat completions.

Two halves in one module:

- `DeploymentManager` (in the API process; never imports torch): starts one model-server subprocess per
  deployment in its own process group on a free loopback port, watches it become ready (`pending` ->
  `active`) or die (`failed` with the last lines of its stderr), and stops it on delete (`deleted`).
  Deployments that were live when the server stopped are started again on the next start.
- `main()` (the subprocess, `python -m server.deploy --model-dir DIR --port P [--base-model ID]`): loads the
  model (`runrl_engine.serving.load_for_serving`: a full `final/`, or a LoRA adapter merged into its base at
  load; bfloat16 on a GPU, float32 on CPU) and serves `GET /health` (with the batcher's counters),
  `GET /v1/models` and `POST /v1/chat/completions` (plain, or streaming as `text/event-stream` chunks ending
  with `data: [DONE]`), prompts built with the tokenizer's chat template. Concurrent requests are decoded
  together (`runrl_engine.serving.Batcher`: continuous batching, up to `--max-batch-size` completions; a request
  joins the running batch at the next decode step). `max_tokens`/`max_completion_tokens`, `temperature`,
  `top_p`, `stop`, `n`, `seed` and `stream_options.include_usage` are honoured per request and checked
  (`parse_chat`): a bad value, an unknown key, or a feature this server lacks (`tools`, `logprobs`, penalties,
  `response_format` other than text, ...) is a 400 in OpenAI's error shape naming the `param`.

The public `api_url` is `{base}/api/v1/deployments/{id}`: the API proxies `{api_url}/v1/chat/completions`
to the subprocess, so inference uses the same keys, scopes and quotas as the rest of the API.

Who can reach a model server: it listens on 127.0.0.1 only, and answers every request (`/health` and
`/v1/models` included) 401 unless it carries `Authorization: Bearer <secret>` (constant-time compare). The
secret is random per deployment start (`secrets.token_urlsafe(32)`), held only in the API process's memory
(`DeploymentManager.token`; a restart starts every live deployment again with a fresh one) and handed to the
subprocess in its environment (`RUNRL_DEPLOY_TOKEN`, removed from `os.environ` at startup), never on the
command line: `/proc/<pid>/cmdline` is world-readable, `/proc/<pid>/environ` only to the same uid and root.
User code runs in bubblewrap as another uid in its own pid namespace, so it can reach the port (when a run may
use the network) but not the secret. Without bubblewrap, user code runs as the server's uid and could read it
(see `require_isolation` in settings.py). Only the API's proxy and readiness probe send the secret; the
caller's API key is never forwarded.

Model servers do not outlive the API server: each sets `PR_SET_PDEATHSIG` = SIGKILL at startup (and exits if
its parent is already gone), so a kill -9 of the API process kills them too; on Linux the signal follows the
*thread* that started the child, so `start()` runs on a thread that lives as long as the server (the event
loop's: the create route and the lifespan's `resume_all`). Where prctl is unavailable, a thread polls the
parent pid instead. `resume_all` still kills recorded leftovers at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runrl_engine.rundir import RunDir
from server.store import Store, now_iso

READY_TIMEOUT_S = 600.0
REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN_ENV = "RUNRL_DEPLOY_TOKEN"  # the per-deployment secret, to the subprocess (never argv)
PARENT_ENV = "RUNRL_DEPLOY_PARENT"  # the API process's pid, so the subprocess can tell its parent died


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeploymentManager:
    def __init__(self, store: Store, runs_dir: Path, command: tuple[str, ...], logs_dir: Path):
        self.store = store
        self.runs_dir = runs_dir
        self.command = command
        self.logs_dir = logs_dir
        self._procs: dict[int, subprocess.Popen] = {}
        self._tokens: dict[int, str] = {}  # deployment id -> the secret its running model server demands
        self._watchers: list[threading.Thread] = []
        self._closing = threading.Event()
        self._lock = threading.Lock()

    def model_dir(self, run_id: int) -> Path:
        return RunDir(self.runs_dir / str(run_id)).final

    def has_model(self, run_id: int) -> bool:
        """Whether the run's `final/` holds a model (`RunDir.has_model`; a LoRA adapter is served on its base
        model)."""
        return RunDir(self.runs_dir / str(run_id)).has_model

    def token(self, deployment_id: int) -> str | None:
        """The secret the deployment's running model server demands (None when none runs here)."""
        with self._lock:
            return self._tokens.get(deployment_id)

    def start(self, deployment_id: int) -> None:
        row: dict[str, Any] = self.store.deployments.get(deployment_id)  # type: ignore[assignment]  (inserted or live)
        port = _free_port()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{deployment_id}.log"
        token = secrets.token_urlsafe(32)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                            if p), TOKEN_ENV: token, PARENT_ENV: str(os.getpid())}
        with open(log_path, "wb") as log:
            base = ["--base-model", row["base_model"]] if row["base_model"] else []
            proc = subprocess.Popen([*self.command, "--model-dir", str(self.model_dir(row["run_id"])), "--port",
                                     str(port), "--name", f"run-{row['run_id']}", *base], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        with self._lock:
            self._procs[deployment_id] = proc
            self._tokens[deployment_id] = token
        self.store.deployments.update(deployment_id, {"status": "pending", "pid": proc.pid, "port": port,
                                                      "error_message": None, "updated_at": now_iso()})
        self.store.notify("deployment", deployment_id, "pending")  # webhooks (never raises)
        watcher = threading.Thread(target=self._watch, args=(deployment_id, proc, port, log_path, token),
                                   daemon=True)
        watcher.start()
        self._watchers.append(watcher)

    def _watch(self, deployment_id: int, proc: subprocess.Popen, port: int, log_path: Path, token: str) -> None:
        import httpx

        deadline = time.time() + READY_TIMEOUT_S
        auth = {"Authorization": f"Bearer {token}"}
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers=auth, timeout=2).status_code == 200:
                    self._set(deployment_id, "active", only_from="pending")
                    proc.wait()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            self._kill(proc)
        with self._lock:
            if self._procs.get(deployment_id) is proc:
                del self._procs[deployment_id]
                self._tokens.pop(deployment_id, None)
        if self._closing.is_set():
            return  # stopped by a server shutdown: the deployment stays live and restarts with the server
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-8:]
        reason = "\n".join(tail) or f"model server exited with code {proc.returncode}"
        self._set(deployment_id, "failed", error_message=f"The model server stopped: {reason}"[-2000:])

    def _set(self, deployment_id: int, status: str, only_from: str | None = None, **values: Any) -> None:
        if self.store.deployments.set_status(deployment_id, status, only_from, values):
            self.store.notify("deployment", deployment_id, status)  # webhooks (never raises)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, deployment_id: int) -> None:
        """Mark deleted (before killing, so the watcher does not record a failure) and stop the process."""
        self.store.deployments.mark_deleted(deployment_id)
        self.store.notify("deployment", deployment_id, "deleted")  # webhooks (never raises)
        with self._lock:
            proc = self._procs.pop(deployment_id, None)
            self._tokens.pop(deployment_id, None)
        if proc is not None:
            self._kill(proc)

    def resume_all(self) -> None:
        """After a restart: stop model servers left behind and start every live deployment again."""
        for row in self.store.deployments.live():
            if row["pid"]:
                try:
                    cmdline = Path(f"/proc/{row['pid']}/cmdline").read_bytes()
                    if b"server.deploy" in cmdline:
                        os.killpg(row["pid"], signal.SIGKILL)
                except OSError:
                    pass
            self.start(row["id"])

    def shutdown(self) -> None:
        """Stop every model server; their deployments keep their status, so the next start resumes them."""
        self._closing.set()
        with self._lock:
            procs = list(self._procs.values())
            self._procs.clear()
            self._tokens.clear()
        for proc in procs:
            self._kill(proc)
        for watcher in self._watchers:
            watcher.join(timeout=10)


# ---- the model server (subprocess) ---------------------------------------------------------------------------

def require_token(app: Any, token: str) -> Any:
    """ASGI wrapper: every HTTP request without `Authorization: Bearer <token>` gets a 401 (websockets are closed)."""
    expected = f"Bearer {token}".encode("latin-1")
    body = json.dumps({"error": {"message": "Missing or invalid credential", "type": "authentication_error"}}).encode()

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(got, expected):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def _die_with_parent() -> None:
    """SIGKILL this process when the API process that started it dies; exit now if it is already gone."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit():
        return  # started by hand, not by a DeploymentManager
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError):
        def poll() -> None:  # no prctl: notice the parent's death within a second
            while os.getppid() == int(parent):
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=poll, daemon=True).start()
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


class BadRequest(Exception):
    """A chat-completions request the model server refuses: 400, OpenAI's error shape, naming `param`."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param, self.message = param, message


DEFAULT_MAX_TOKENS = 1024  # when a request sets neither max_tokens nor max_completion_tokens (less near the context)
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
ROLES = ("system", "developer", "user", "assistant", "tool")
# Accepted and without effect here: routing/bookkeeping keys of OpenAI's API.
IGNORED = ("model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort")
# Refused unless absent or at their no-op value: what this server does not implement.
UNSUPPORTED: dict[str, Any] = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                               "function_call": (None, "none"), "logprobs": (None, False), "top_logprobs": (None,),
                               "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                               "response_format": (None, {"type": "text"}), "audio": (None,),
                               "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,)}
SAMPLING_KEYS = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "seed",
                 "stream", "stream_options")


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequest(key, f"`{key}` must be a number between {low:g} and {high:g} (got {value!r})")
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(key, f"`{key}` must be an integer {bound} (got {value!r})")
    return value


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise BadRequest(f"messages[{i}].content", f"`messages[{i}].content`: only text parts are supported")
    raise BadRequest(f"messages[{i}].content", f"`messages[{i}].content` must be a string or a list of text parts")


def parse_chat(body: Any, max_n: int) -> dict[str, Any]:
    """Check an OpenAI chat-completions body; returns messages, the sampling settings and the stream options.
    `max_tokens` is None when the request sets none (the caller knows the prompt's length and the context)."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(SAMPLING_KEYS) - set(IGNORED) - set(UNSUPPORTED))
    if unknown:
        raise BadRequest(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}")
    for key, allowed in UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise BadRequest(key, f"`{key}` is not supported by this deployment")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "`messages` must be a non-empty list of {role, content}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role", f"`messages[{i}].role` must be one of {', '.join(ROLES)}")
        if m.get("tool_calls"):
            raise BadRequest(f"messages[{i}].tool_calls", f"`messages[{i}].tool_calls`: tool calls are not supported "
                                                          "by this deployment")
        turns.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)})
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stops)):
        raise BadRequest("stop", f"`stop` must be a non-empty string or a list of at most {MAX_STOP} of them")
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream", "`stream` must be true or false")
    if options is not None and (not stream or not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise BadRequest("stream_options", "`stream_options` is an object ({\"include_usage\": bool}) and only "
                                           "allowed with `stream: true`")
    seed = _integer(body, "seed", -2**63, 2**63 - 1)
    return {"messages": turns, "max_tokens": max_tokens, "temperature": _number(body, "temperature", 1.0, 0, 2),
            "top_p": _number(body, "top_p", 1.0, 0, 1), "stop": tuple(stops), "seed": seed,
            "n": _integer(body, "n", 1, max_n) or 1, "stream": bool(stream),
            "include_usage": bool((options or {}).get("include_usage"))}


def build_model_app(model_dir: str, name: str, base_model: str | None = None, max_batch_size: int = 16) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from runrl_engine.config import RunConfig
    from runrl_engine.models import load_tokenizer
    from runrl_engine.serving import Batcher, Job, Sampling, load_for_serving

    loaded = load_for_serving(model_dir, base_model)
    # the HTTP side encodes with a tokenizer of its own: a fast tokenizer is not safe to share across threads
    encoder = load_tokenizer(RunConfig(model=model_dir))
    batcher = Batcher(loaded, max_batch_size, log=lambda line: print(line, file=sys.stderr, flush=True))
    batcher.start()

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> Any:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status)

    def encode(req: dict[str, Any]) -> list[int]:
        try:
            text = encoder.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the model's chat template refused the conversation (jinja's raise_exception)
            raise BadRequest("messages", f"the model's chat template refused the messages: {exc}") from None
        prompt = encoder(text, add_special_tokens=False)["input_ids"]
        room = loaded.context - len(prompt)
        if room < 1:
            raise BadRequest("messages", f"the prompt is {len(prompt)} tokens; the model's context is "
                                         f"{loaded.context} tokens")
        if req["max_tokens"] is None:
            req["max_tokens"] = min(DEFAULT_MAX_TOKENS, room)
        elif req["max_tokens"] > room:
            raise BadRequest("max_tokens", f"max_tokens {req['max_tokens']} and the prompt's {len(prompt)} tokens "
                                           f"exceed the model's context of {loaded.context} tokens")
        return prompt

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": name, **loaded.describe(), "batching": batcher.stats()})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "runrl"}]})

    async def chat(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "the request body is not valid JSON")
        try:
            req = parse_chat(body, batcher.max_batch_size)
            prompt = encode(req)
        except BadRequest as exc:
            return error(400, exc.message, exc.param)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event: Any) -> None:  # on the batcher thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

        n = req["n"]
        job = Job(prompt=prompt, n=n, on_event=deliver,
                  sampling=Sampling(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                                    stop=req["stop"], seed=req["seed"]))
        batcher.submit(job)
        base = {"id": f"chatcmpl-{os.urandom(12).hex()}", "created": int(time.time()),
                "model": body.get("model") if isinstance(body.get("model"), str) else name}
        usage = {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}

        if req["stream"]:
            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                data = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
                if req["include_usage"] and "usage" not in extra:
                    data["usage"] = None
                return f"data: {json.dumps(data)}\n\n"

            async def chunks() -> Any:
                try:
                    for i in range(n):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}])
                    left = n
                    while left:
                        ev = await events.get()
                        if ev.finish == "error":
                            err = {"message": ev.delta, "type": "server_error", "param": None, "code": None}
                            yield f"data: {json.dumps({'error': err})}\n\n"
                            break
                        if ev.delta:
                            yield chunk([{"index": ev.index, "delta": {"content": ev.delta}, "logprobs": None,
                                          "finish_reason": None}])
                        if ev.finish:
                            left -= 1
                            usage["completion_tokens"] += ev.tokens
                            yield chunk([{"index": ev.index, "delta": {}, "logprobs": None,
                                          "finish_reason": ev.finish}])
                    else:
                        if req["include_usage"]:
                            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                            yield chunk([], usage=usage)
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancel()  # a client that went away stops its rows at the next step; no-op once finished

            return StreamingResponse(chunks(), media_type="text/event-stream")

        async def watch_disconnect() -> None:  # a client that went away stops its rows at the next step
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()

        watcher = asyncio.ensure_future(watch_disconnect())
        texts, finish = [""] * n, [None] * n
        try:
            while any(f is None for f in finish):
                ev = await events.get()
                if ev.finish == "error":
                    return error(500, ev.delta, kind="server_error")
                texts[ev.index] += ev.delta
                if ev.finish:
                    finish[ev.index] = ev.finish
                    usage["completion_tokens"] += ev.tokens
        finally:
            watcher.cancel()
            job.cancel()
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse({**base, "object": "chat.completion",
                             "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                                          "logprobs": None, "finish_reason": finish[i]} for i in range(n)],
                             "usage": usage})

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        batcher.close()

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve a run's final model (OpenAI-compatible chat completions)")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="runrl-model")
    parser.add_argument("--base-model", default=None,
                        help="the run's model id: the base of an adapter-only final/ when the base its "
                             "adapter_config.json records is not on this machine")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="completions decoded together at most (requests beyond it wait for a free row)")
    args = parser.parse_args(argv)
    _die_with_parent()
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        sys.exit(f"error: {TOKEN_ENV} is not set; the model server answers only requests that carry it as "
                 "`Authorization: Bearer <secret>`")
    import uvicorn

    app = build_model_app(args.model_dir, args.name, args.base_model, args.max_batch_size)
    uvicorn.run(require_token(app, token), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
