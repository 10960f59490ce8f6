"""A real uvicorn server on loopback per test (temp data dir), plus keys made through `runrl keys create`'s
function. Servers run in a thread here; tests that must kill a server run it as a subprocess instead."""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.cli import create_key
from server.settings import Settings
from server.store import Store, now_iso


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str  # .../api/v1
    settings: Settings
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    def key(self, user: str = "alice", scopes: str = "read,write", name: str = "test") -> str:
        return create_key(name=name, scopes=scopes.split(","), user=user, data_dir=self.settings.data_dir)

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(settings: Settings) -> LiveServer:
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}/api/v1", settings, app, server, thread)


# A stand-in for `runrl train`, only for tests about the queue itself: it writes logs/metrics like the
# trainer, sleeps SLEEP seconds and exits with CODE (from the config file the worker wrote); a negative CODE
# kills it with that signal (code=-9: SIGKILL, as the OOM killer does).
STAND_IN = r"""
import json, sys, time, yaml, pathlib
cfg = yaml.safe_load(open(sys.argv[1])); out = pathlib.Path(sys.argv[sys.argv.index('--output') + 1])
if '--secrets-stdin' in sys.argv:
    cfg.update(json.loads(sys.stdin.read() or '{}'))
extra = cfg.get('run_name') or 'sleep=0.2,code=0'
opts = dict(kv.split('=') for kv in extra.split(','))
with open(out / 'logs.txt', 'a') as log:
    log.write('starting with token ' + str(cfg.get('hf_token')) + '\n'); log.flush()
    for step in (1, 2):
        with open(out / 'metrics.jsonl', 'a') as m:
            m.write(json.dumps({'step': step, 'reward_mean': 0.5 * step, 'loss': 1.0 / step}) + '\n')
        with open(out / 'completions.jsonl', 'a') as c:
            c.write(json.dumps({'step': step, 'prompt': [], 'completion': 'hi', 'reward': 1.0, 'info': {}}) + '\n')
        log.write(f'step {step}\n'); log.flush()
        time.sleep(float(opts['sleep']) / 2)
if int(opts['code']) < 0:
    import os
    os.kill(os.getpid(), -int(opts['code']))
if opts['code'] == '2':
    print('error: prompt.jsonl:3: bad line\n  fix: repair it', file=sys.stderr)
elif opts['code'] != '0':
    print('[log] a line before the crash\nTraceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: boom', file=sys.stderr)
sys.exit(int(opts['code']))
"""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", poll_interval_s=0.1, cancel_grace_s=2.0,
                    train_command=(sys.executable, "-c", STAND_IN))


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    srv = start_server(settings)
    yield srv
    srv.stop()


@pytest.fixture
def make_live(tmp_path: Path) -> Iterator[Any]:
    started: list[LiveServer] = []

    def make(settings: Settings) -> LiveServer:
        srv = start_server(settings)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def completed_run(store: Store, user: str = "alice") -> int:
    """A COMPLETED builtin:tiny run row of `user`, written straight to the store (its final/ is the caller's)."""
    now = now_iso()
    return store.insert("runs", {"user_id": store.get_or_create_user(user), "status": "COMPLETED",
                                 "type": "reward_function", "model": "builtin:tiny", "parameters": {}, "config": {},
                                 "created_at": now, "updated_at": now, "completed_at": now})


def wait_status(client: httpx.Client, run_id: int, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.time() + timeout
    while True:
        run = client.get(f"/runs/{run_id}").json()["data"]
        if run["status"] in statuses:
            return run
        if time.time() > deadline:
            raise AssertionError(f"run {run_id} stayed {run['status']}")
        time.sleep(0.1)


PROMPTS = "\n".join(
    '{"prompt": [{"role": "user", "content": "Say %s"}], "expected": "%s"}' % (w, w)
    for w in ("hi", "yo", "ok", "no", "up", "go")) + "\n"
REWARD = "def reward_fn(completion, **kwargs):\n    return float(kwargs.get('expected', '') in completion)\n"
