"""Deployments: serve a finished run's `final/` model with OpenAI-compatible chat completions.

Two halves in one module:

- `DeploymentManager` (in the API process; never imports torch): starts one model-server subprocess per
  deployment in its own process group on a free loopback port, watches it become ready (`pending` ->
  `active`) or die (`failed` with the last lines of its stderr), and stops it on delete (`deleted`).
  Deployments that were live when the server stopped are started again on the next start.
- `main()` (the subprocess, `python -m server.deploy --model-dir DIR --port P`): loads the model with
  transformers and serves `GET /health`, `GET /v1/models` and `POST /v1/chat/completions` (plain, or
  streaming as `text/event-stream` chunks ending with `data: [DONE]`), prompts built with the tokenizer's
  chat template. One generation at a time.

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
        return self.runs_dir / str(run_id) / "final"

    def token(self, deployment_id: int) -> str | None:
        """The secret the deployment's running model server demands (None when none runs here)."""
        with self._lock:
            return self._tokens.get(deployment_id)

    def start(self, deployment_id: int) -> None:
        row = self.store.one("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        port = _free_port()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{deployment_id}.log"
        token = secrets.token_urlsafe(32)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                            if p), TOKEN_ENV: token, PARENT_ENV: str(os.getpid())}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*self.command, "--model-dir", str(self.model_dir(row["run_id"])), "--port",
                                     str(port), "--name", f"run-{row['run_id']}"], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        with self._lock:
            self._procs[deployment_id] = proc
            self._tokens[deployment_id] = token
        self.store.update("deployments", "id", deployment_id, {"status": "pending", "pid": proc.pid, "port": port,
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
        sql = "UPDATE deployments SET status = ?, updated_at = ?" + "".join(f", {k} = ?" for k in values)
        sql += " WHERE id = ? AND status IN (?, ?)"
        allowed = (only_from, only_from) if only_from else ("pending", "active")
        if self.store.execute(sql, [status, now_iso(), *values.values(), deployment_id, *allowed]):
            self.store.notify("deployment", deployment_id, status)  # webhooks (never raises)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, deployment_id: int) -> None:
        """Mark deleted (before killing, so the watcher does not record a failure) and stop the process."""
        self.store.execute("UPDATE deployments SET status = 'deleted', deleted_at = ?, updated_at = ? WHERE id = ?",
                           (now_iso(), now_iso(), deployment_id))
        self.store.notify("deployment", deployment_id, "deleted")  # webhooks (never raises)
        with self._lock:
            proc = self._procs.pop(deployment_id, None)
            self._tokens.pop(deployment_id, None)
        if proc is not None:
            self._kill(proc)

    def resume_all(self) -> None:
        """After a restart: stop model servers left behind and start every live deployment again."""
        for row in self.store.all("SELECT * FROM deployments WHERE status IN ('pending', 'active')"):
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


def build_model_app(model_dir: str, name: str) -> Any:
    import torch
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    lock = threading.Lock()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    def prepare(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("`messages` must be a non-empty list of {role, content}")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        temperature = float(body.get("temperature", 1.0))
        gen = {"max_new_tokens": max(1, min(int(body.get("max_tokens") or body.get("max_completion_tokens") or 128),
                                            4096)),
               "do_sample": temperature > 0, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
        if temperature > 0:
            gen.update(temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        return dict(inputs), gen

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "runrl"}]})

    async def chat(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
            inputs, gen = prepare(body)
        except (ValueError, TypeError) as exc:
            return error(400, str(exc))
        created, cid = int(time.time()), f"chatcmpl-{os.urandom(8).hex()}"
        base = {"id": cid, "created": created, "model": body.get("model") or name}
        if body.get("stream"):
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

            def run() -> None:
                with lock, torch.no_grad():
                    model.generate(**inputs, **gen, streamer=streamer)

            threading.Thread(target=run, daemon=True).start()

            def chunks() -> Any:
                first = {"role": "assistant", "content": ""}
                yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [{'index': 0, 'delta': first, 'finish_reason': None}]})}\n\n"
                for piece in streamer:
                    if piece:
                        delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                        yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [delta]})}\n\n"
                end = {"index": 0, "delta": {}, "finish_reason": "stop"}
                yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [end]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")

        def run_plain() -> tuple[str, int, int, str]:
            with lock, torch.no_grad():
                out = model.generate(**inputs, **gen)
            new = out[0, inputs["input_ids"].shape[1]:]
            finish = "length" if len(new) >= gen["max_new_tokens"] else "stop"
            return tokenizer.decode(new, skip_special_tokens=True), inputs["input_ids"].shape[1], len(new), finish

        text, n_prompt, n_new, finish = await asyncio.to_thread(run_plain)
        return JSONResponse({**base, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": finish}],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                                       "total_tokens": n_prompt + n_new}})

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve a run's final model (OpenAI-compatible chat completions)")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="runrl-model")
    args = parser.parse_args(argv)
    _die_with_parent()
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        sys.exit(f"error: {TOKEN_ENV} is not set; the model server answers only requests that carry it as "
                 "`Authorization: Bearer <secret>`")
    import uvicorn

    uvicorn.run(require_token(build_model_app(args.model_dir, args.name), token), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
