"""User code's network under a destination policy (issue 16 finding 1, network half): `reward_network: filtered`.

Real bubblewrap sandboxes (skipped where bubblewrap is unusable) talk to real servers on this host's loopback
through the real egress proxy: what the policy allows arrives, what it denies gets 403 and never reaches the
server (its accept counter stays 0), raw sockets have no way out, and `egress=None` keeps the host network.
The proxy's own refusals (malformed requests, limits, close) are checked on its Unix socket directly.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from runrl_engine import train
from runrl_engine.config import RunConfig
from runrl_engine.errors import ConfigError
from runrl_engine.netpolicy import DestinationPolicy
from runrl_engine.sandbox import EnvSandbox, RewardSandbox, detect_isolation
from runrl_engine.sandbox.egress import EgressProxy, EgressUnavailable

QS = Path(__file__).resolve().parents[2] / "configs" / "data" / "quickstart"
BWRAP = detect_isolation("auto")
needs_bwrap = pytest.mark.skipif(BWRAP.mode != "bwrap", reason=f"bubblewrap unusable here: {BWRAP.reason}")

REWARD = """
    import hashlib, http.client, os, socket, time, urllib.parse, urllib.request

    def get(url):
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def raw(host, port):
        socket.create_connection((host, port), timeout=3).close()
        return "connected"

    def tunnel(port, payload):
        proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
        conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=10)
        conn.set_tunnel("127.0.0.1", port)
        conn.connect()
        conn.sock.sendall(payload.encode())
        conn.sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.sock.recv(65536):
            data += chunk
        return f"{len(data)} {hashlib.sha256(data).hexdigest()}"  # info strings are capped at 2000 chars

    def reward_fn(completion, action, args, **kw):
        if action == "uncaught":
            raw(*args)
        started = time.monotonic()
        try:
            result = globals()[action](*args)
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"
        return 1.0, {"result": result, "seconds": time.monotonic() - started,
                     "proxy": os.environ.get("HTTPS_PROXY", "none")}
"""


class _Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from A {self.path} connection={self.headers.get('Connection')} " \
               f"proxy-auth={self.headers.get('Proxy-Authorization')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Tcp:
    """A loopback TCP server counting accepted connections; `echo` sends back what it read, upper-cased."""

    def __init__(self, echo: bool):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port, self.accepted, self.echo = self.sock.getsockname()[1], 0, echo
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                data = b""
                while self.echo and (chunk := conn.recv(65536)):
                    data += chunk
                if self.echo:
                    conn.sendall(data.upper())


@pytest.fixture(scope="module")
def servers() -> Iterator[dict]:
    a = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    threading.Thread(target=a.serve_forever, daemon=True).start()
    b, echo = _Tcp(echo=False), _Tcp(echo=True)
    yield {"a": a.server_address[1], "b": b, "echo": echo}
    a.shutdown()
    b.sock.close()
    echo.sock.close()


def _code(directory: Path, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "reward.py"
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture(scope="module")
def filtered(servers, tmp_path_factory) -> Iterator[RewardSandbox]:
    """Network on, only A and the echo server allowed. The work dir is deep on purpose: the pool's own path
    would be too long for a Unix socket address, so the proxy takes a short private directory instead."""
    base = tmp_path_factory.mktemp("egress")
    work = base / ("deep-" * 20) / "sandbox"
    policy = DestinationPolicy(allowed=(f"127.0.0.1:{servers['a']}", f"127.0.0.1:{servers['echo'].port}"),
                               hint="allowed by reward_allowed_destinations")
    with RewardSandbox(_code(base, REWARD), num_workers=1, timeout_s=20, allow_network=True, egress=policy,
                       isolation="bwrap", work_dir=work) as sb:
        yield sb


def _run(sb: RewardSandbox, action: str, *args: object) -> dict:
    (result,) = sb.score(["x"], [{"action": action, "args": list(args)}])
    assert result.error is None, result.error
    return result.info


@needs_bwrap
def test_an_allowed_destination_is_reached_through_the_proxy(filtered, servers):
    before = filtered.egress.stats.connected
    info = _run(filtered, "get", f"http://127.0.0.1:{servers['a']}/path?q=1")
    # The request went through the proxy (the env points there; the proxy connected), which sent it on in
    # origin form with Connection: close.
    assert info["result"] == "hello from A /path?q=1 connection=close proxy-auth=None"
    assert info["proxy"] == "http://127.0.0.1:3128"
    assert filtered.egress.stats.connected == before + 1


@needs_bwrap
def test_a_loopback_port_not_allowed_is_refused_and_never_reached(filtered, servers):
    b = servers["b"]
    info = _run(filtered, "get", f"http://127.0.0.1:{b.port}/")
    assert "HTTPError" in info["result"] and "403" in info["result"]
    assert f"destination 127.0.0.1:{b.port} refused" in info["result"] and "loopback" in info["result"]
    info = _run(filtered, "tunnel", b.port, "hi")
    assert "Tunnel connection failed: 403" in info["result"]
    time.sleep(0.2)
    assert b.accepted == 0


@needs_bwrap
def test_raw_sockets_have_no_way_out(filtered, servers):
    # Only the sandbox's own loopback exists: nothing listens on A there, and nothing else is routed.
    assert _run(filtered, "raw", "127.0.0.1", servers["a"])["result"].startswith("ConnectionRefusedError")
    assert "Network is unreachable" in _run(filtered, "raw", "1.1.1.1", 80)["result"]
    (failed,) = filtered.score(["x"], [{"action": "uncaught", "args": ["1.1.1.1", 80]}])
    assert "Network is unreachable" in failed.error and "only through the HTTP(S) proxy in $HTTPS_PROXY" in failed.error


@needs_bwrap
def test_a_connect_tunnel_to_an_allowed_port_carries_bytes_both_ways(filtered, servers):
    echo = servers["echo"]
    before = echo.accepted
    expected = ("PING " * 20000).encode()
    assert _run(filtered, "tunnel", echo.port, "ping " * 20000)["result"] == \
        f"{len(expected)} {hashlib.sha256(expected).hexdigest()}"
    assert echo.accepted == before + 1


@needs_bwrap
@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/"])
def test_metadata_and_private_addresses_are_refused_without_a_connection(filtered, url):
    attempts = filtered.egress.stats.connect_attempts
    info = _run(filtered, "get", url)
    assert "403" in info["result"] and ("link-local" in info["result"] or "private" in info["result"])
    assert filtered.egress.stats.connect_attempts == attempts  # refused before any connect()
    assert info["seconds"] < 3  # no connect timeout was waited for


@needs_bwrap
def test_without_a_policy_network_on_is_the_host_network(servers, tmp_path):
    with RewardSandbox(_code(tmp_path, REWARD), num_workers=1, timeout_s=20, allow_network=True,
                       isolation="bwrap", work_dir=tmp_path / "sandbox") as sb:
        info = _run(sb, "raw", "127.0.0.1", servers["a"])
        assert sb.egress is None
    assert info["result"] == "connected" and info["proxy"] == "none"


@needs_bwrap
def test_environments_get_the_same_filtered_network(servers, tmp_path):
    env = _code(tmp_path, """
        import urllib.request
        class CustomEnv:
            def setup(self, **row):
                pass
            def step(self, action):
                try:
                    text = urllib.request.urlopen(action, timeout=10).read().decode()
                except Exception as exc:
                    text = str(exc)
                return {"observation": text, "reward": 1.0, "done": True}
    """)
    policy = DestinationPolicy(allowed=(f"127.0.0.1:{servers['a']}",))
    with EnvSandbox(env, num_workers=1, timeout_s=20, allow_network=True, egress=policy, isolation="bwrap",
                    work_dir=tmp_path / "sandbox") as sb:
        ids = [s.env_id for s in sb.create([{}, {}])]
        steps = sb.step(ids, [f"http://127.0.0.1:{servers['a']}/", f"http://127.0.0.1:{servers['b'].port}/"])
    assert steps[0].observation.startswith("hello from A /")
    assert "403" in steps[1].observation
    assert servers["b"].accepted == 0


@needs_bwrap
def test_a_training_run_with_a_filtered_network(servers, tmp_path, tiny_model_dir):
    # The trainer builds the policy from the config keys and hands it to the sandbox.
    reward = _code(tmp_path, f"""
        import urllib.error, urllib.request
        def reward_fn(completion, **row):
            ok = urllib.request.urlopen("http://127.0.0.1:{servers['a']}/", timeout=10).read().startswith(b"hello")
            try:
                urllib.request.urlopen("http://127.0.0.1:{servers['b'].port}/", timeout=10)
                return 0.0
            except urllib.error.HTTPError as exc:
                return float(ok and exc.code == 403 and "reward_allowed_destinations" in exc.reason)
    """)
    train(dict(model="builtin:tiny", prompt_file=str(QS / "prompts.jsonl"), reward_file=str(reward),
               completion_length=4, max_steps=1, prompts_per_step=2, num_generations=2, micro_batch_size=4,
               eval_every=0, save_every=0, reward_workers=1, reward_allow_network=True, reward_network="filtered",
               reward_allowed_destinations=[f"127.0.0.1:{servers['a']}"], sandbox_isolation="bwrap"),
          output_dir=tmp_path / "run")
    [metrics] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["reward_mean"] == 1.0 and metrics["reward_errors"] == 0
    assert "network only through its egress proxy" in (tmp_path / "run" / "logs.txt").read_text()
    assert servers["b"].accepted == 0


def test_a_filtered_network_refuses_to_start_without_bubblewrap(tmp_path):
    with pytest.raises(EgressUnavailable) as caught:
        RewardSandbox(_code(tmp_path, REWARD), allow_network=True, egress=DestinationPolicy(),
                      isolation="subprocess", work_dir=tmp_path / "sandbox")
    assert caught.value.where == "reward_network"
    assert not list((tmp_path / "sandbox").glob("*"))  # nothing started, nothing left behind
    base = dict(model="builtin:tiny", prompt_file="p.jsonl", reward_file="r.py")
    with pytest.raises(ConfigError, match="reward_network"):
        RunConfig.from_dict({**base, "reward_network": "filtered", "sandbox_isolation": "subprocess"}, source="run")
    with pytest.raises(ConfigError, match="reward_allowed_destinations"):
        RunConfig.from_dict({**base, "reward_allowed_destinations": ["http://10.0.0.1/"]}, source="run")


# ---- the proxy itself, on its Unix socket ----------------------------------------------------------------------

def _ask(proxy: EgressProxy, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(proxy.path))
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("request_head, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),                                 # origin form: not a proxy request
    (b"GET https://example.com/ HTTP/1.1\r\n\r\n", b"400"),                         # TLS goes through CONNECT
    (b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n", b"400"),                                # no port
    (b"CONNECT bad\x01host:80 HTTP/1.1\r\n\r\n", b"400"),
    (b"nonsense\r\n\r\n", b"400"),
    (b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nBroken\r\n\r\n", b"400"),                # malformed header
    (b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n", b"502"),                             # allowed, nothing listens
    (b"CONNECT [::ffff:10.0.0.1]:80 HTTP/1.1\r\n\r\n", b"403"),                     # a mapped private address
])
def test_the_proxy_answers_what_it_does_not_serve(tmp_path, request_head, status):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    head = request_head % port if b"%d" in request_head else request_head
    with EgressProxy(DestinationPolicy(allowed=(f"127.0.0.1:{port}",)), tmp_path / "p.sock") as proxy:
        reply = _ask(proxy, head)
        assert reply.startswith(b"HTTP/1.1 " + status), reply
        assert reply.endswith(b"\n") and b"\r\n\r\n" in reply  # a complete answer with a one-line reason
        if status != b"502":
            assert proxy.stats.connect_attempts == 0


def test_the_proxy_is_bounded_and_closes_everything(tmp_path, servers):
    echo = servers["echo"]
    with EgressProxy(DestinationPolicy(allowed=(f"127.0.0.1:{echo.port}",)), tmp_path / "p.sock",
                     max_connections=2, header_timeout_s=1.0) as proxy:
        assert (proxy.path.stat().st_mode & 0o777) == 0o600
        held = socket.socket(socket.AF_UNIX)
        held.connect(str(proxy.path))
        held.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
        assert held.recv(100).startswith(b"HTTP/1.1 200 Connection established")
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(str(proxy.path))  # sends half a head: dropped after header_timeout_s
        slow.sendall(b"CONNECT 127.0.0.1:80")
        third = socket.socket(socket.AF_UNIX)
        third.connect(str(proxy.path))
        third.settimeout(5)
        assert third.recv(100).startswith(b"HTTP/1.1 503")  # the slow one and the tunnel fill the pool
        third.close()
        slow.settimeout(5)
        assert slow.recv(100).startswith(b"HTTP/1.1 400")  # its head never came
        slow.close()
    held.settimeout(5)
    assert held.recv(100) == b""  # close() ended the open tunnel
    held.close()
    assert not proxy.path.exists()
