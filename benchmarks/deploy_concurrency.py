"""A deployment's model server: 16 concurrent chat completions vs the same 16 one after another.

Starts the real model server (`python -m server.deploy`, what a deployment runs) on the real SmolLM2-135M-Instruct
(`builtin:smollm2-135m-instruct`, CPU, float32), warms it up with one request, then sends the same 16 greedy
requests (16 different questions, `max_tokens` each) sequentially and then all at once, over HTTP on loopback.
Throughput = completion tokens / wall time of the batch of 16. The model server's own counters (`/health`) say how
many rows its decode steps ran with. The last line is one JSON object.

    python benchmarks/deploy_concurrency.py                 # 16 requests x 32 tokens
    python benchmarks/deploy_concurrency.py --max-tokens 64 --requests 8
    python benchmarks/deploy_concurrency.py --threads 1     # the model server on one thread (a shared CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the moon", "rivers", "bread", "chess", "volcanoes", "bees", "the piano", "glaciers", "owls", "copper",
          "tea", "lighthouses", "maple trees", "comets", "bicycles", "coral reefs"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the model server (OMP_NUM_THREADS; default: torch's, all cores)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` still stops the model server (finally)

    sys.path.insert(0, str(ROOT))
    from runrl_engine.tiny import resolve_model_path

    model_dir = resolve_model_path(args.model)
    port, token = _port(), secrets.token_urlsafe(16)
    env = {**os.environ, "RUNRL_DEPLOY_TOKEN": token, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen([sys.executable, "-m", "server.deploy", "--model-dir", model_dir, "--port", str(port),
                             "--max-batch-size", str(max(16, args.requests))], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"model server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)

        def ask(k: int, out: list) -> None:
            body = {"messages": [{"role": "user", "content": f"Tell me about {TOPICS[k % len(TOPICS)]}."}],
                    "temperature": 0, "max_tokens": args.max_tokens}
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=1800)
            r.raise_for_status()
            out[k] = (r.json()["usage"]["completion_tokens"], time.perf_counter() - t0,
                      r.json()["choices"][0]["message"]["content"])

        ask(0, [None])  # warm-up (first forward, weight packing)
        load_before = os.getloadavg()
        seq: list = [None] * args.requests
        t0 = time.perf_counter()
        for k in range(args.requests):
            ask(k, seq)
        seq_s = time.perf_counter() - t0
        before = httpx.get(f"{url}/health", headers=headers).json()["batching"]
        conc: list = [None] * args.requests
        threads = [threading.Thread(target=ask, args=(k, conc)) for k in range(args.requests)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conc_s = time.perf_counter() - t0
        after = httpx.get(f"{url}/health", headers=headers).json()["batching"]
        load_after = os.getloadavg()
    finally:
        proc.kill()
        proc.wait()

    seq_tokens, conc_tokens = sum(x[0] for x in seq), sum(x[0] for x in conc)
    steps = {k: v - before["batch_steps"].get(k, 0) for k, v in after["batch_steps"].items()
             if v - before["batch_steps"].get(k, 0)}
    import torch
    import transformers

    result = {
        "model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
        "sequential_s": round(seq_s, 2), "sequential_tokens": seq_tokens,
        "sequential_tok_s": round(seq_tokens / seq_s, 2),
        "sequential_latency_mean_s": round(sum(x[1] for x in seq) / len(seq), 2),
        "concurrent_s": round(conc_s, 2), "concurrent_tokens": conc_tokens,
        "concurrent_tok_s": round(conc_tokens / conc_s, 2),
        "concurrent_latency_mean_s": round(sum(x[1] for x in conc) / len(conc), 2),
        "ratio_tok_s": round((conc_tokens / conc_s) / (seq_tokens / seq_s), 2),
        "same_text": sum(a[2] == b[2] for a, b in zip(seq, conc)),
        "concurrent_peak_batch": after["peak_batch_size"], "concurrent_batch_steps": steps,
        "nproc": os.cpu_count(), "cpu": _cpu_model(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "server_threads": args.threads or torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
    }
    print(f"sequential: {seq_tokens} tokens in {seq_s:.1f} s = {result['sequential_tok_s']} tok/s; "
          f"concurrent: {conc_tokens} tokens in {conc_s:.1f} s = {result['concurrent_tok_s']} tok/s; "
          f"ratio {result['ratio_tok_s']}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
