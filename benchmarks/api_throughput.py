"""API throughput: authenticated `GET /api/v1/runs` (20 runs in the store) vs a bare Starlette JSON endpoint.

Both servers run the same way (one uvicorn process each, `log_level=warning`, no access log) on loopback, one
after the other, and are driven by the same load generator: CONCURRENCY keep-alive HTTP/1.1 connections
(raw asyncio streams, so the client costs as little as possible) sending requests back to back for
DURATION seconds after a warm-up. The bare endpoint serves the very same JSON document `GET /runs` returns
(same size), so the ratio measures what auth, quota, the SQLite reads and building the run objects cost.

    .venv/bin/python benchmarks/api_throughput.py [--duration 10] [--concurrency 32]

Prints one line per server (req/s, p50/p99 latency) and the ratio; target: API req/s >= 0.5 x bare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

API_SERVER = """
import sys, uvicorn
from pathlib import Path
from server.app import create_app
from server.settings import Settings
app = create_app(Settings(data_dir=Path(sys.argv[1]), start_worker=False))
uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning', access_log=False)
"""

BARE_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
body = open(sys.argv[1], 'rb').read()
async def runs(request):
    return Response(body, media_type='application/json')
app = Starlette(routes=[Route('/api/v1/runs', runs)])
uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning', access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script: str, arg: str) -> tuple[subprocess.Popen, int]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", script, arg, str(port)], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/v1/runs", timeout=1)
            return proc, port
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


async def _worker(port: int, request: bytes, stop_at: float, record_after: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            t1 = time.perf_counter()
            if t0 >= record_after:
                latencies.append(t1 - t0)
    finally:
        writer.close()


async def _load(port: int, token: str, duration: float, concurrency: int, warmup: float) -> list[float]:
    request = (f"GET /api/v1/runs?per_page=20 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n").encode()
    now = time.perf_counter()
    latencies: list[float] = []
    await asyncio.gather(*(_worker(port, request, now + warmup + duration, now + warmup, latencies)
                           for _ in range(concurrency)))
    return latencies


def measure(port: int, token: str, duration: float, concurrency: int, warmup: float) -> dict[str, float]:
    lat = sorted(asyncio.run(_load(port, token, duration, concurrency, warmup)))
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    return {"requests": len(lat), "req_s": len(lat) / duration, "p50_ms": pick(0.50), "p99_ms": pick(0.99)}


def seed(data_dir: Path) -> tuple[str, bytes]:
    """A key, a prompt + reward file and 20 runs (the worker is off, so they stay PENDING); returns the key and
    the body `GET /runs` answers."""
    import httpx

    from server.cli import create_key

    token = create_key(name="bench", scopes=["read", "write"], user="bench", data_dir=data_dir)
    proc, port = start(API_SERVER, str(data_dir))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1",
                          headers={"Authorization": f"Bearer {token}"}) as c:
            prompt = c.post("/files", json={"type": "prompt", "name": "p", "content":
                                            '{"prompt": [{"role": "user", "content": "hi"}]}\n'}).json()["data"]
            reward = c.post("/files", json={"type": "reward_function", "name": "r", "content":
                                            "def reward_fn(completion, **kw):\n    return 1.0\n"}).json()["data"]
            for i in range(20):
                r = c.post("/runs", json={"model": "builtin:tiny", "type": "reward_function",
                                          "prompt_file_id": prompt["id"], "reward_file_id": reward["id"],
                                          "completion_length": 128 + i})
                r.raise_for_status()
            body = c.get("/runs", params={"per_page": 20}).content
            assert len(json.loads(body)["data"]["items"]) == 20
    finally:
        proc.terminate()
        proc.wait()
    return token, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="runrl-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        token, body = seed(data_dir)
        body_path = Path(tmp) / "runs.json"
        body_path.write_bytes(body)
        results = {}
        for name, script, arg in (("bare", BARE_SERVER, str(body_path)), ("api", API_SERVER, str(data_dir))):
            proc, port = start(script, arg)
            try:
                results[name] = measure(port, token, args.duration, args.concurrency, args.warmup)
            finally:
                proc.terminate()
                proc.wait()
    import starlette
    import uvicorn

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"starlette {starlette.__version__}, uvicorn {uvicorn.__version__}")
    print(f"GET /api/v1/runs (20 runs, {len(body)} bytes), {args.concurrency} concurrent keep-alive clients, "
          f"{args.duration:g} s")
    for name, r in results.items():
        print(f"  {name:4s}: {r['req_s']:8.0f} req/s   p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms"
              f"   ({r['requests']} requests)")
    ratio = results["api"]["req_s"] / results["bare"]["req_s"]
    print(f"  ratio api/bare: {ratio:.2f} (target >= 0.5) -> {'PASS' if ratio >= 0.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
