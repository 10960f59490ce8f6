"""The outbound destination policy (issue 16 finding 7, SSRF), against real servers on loopback: a real MCP
server (the `mcp` SDK's MCPServer under uvicorn), a plain `http.server` that is not MCP, a redirecting server
that counts what reaches it, and a real RunRL server with its settings. Plus the policy's rules on addresses
and allow entries, the engine's client refusing at connect time, and the httpx transports a webhook sender
would use."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
import yaml
from mcp.server.mcpserver import MCPServer

from server.settings import Settings
from tests.server.conftest import PROMPTS, REWARD, free_port


class _Counting(http.server.BaseHTTPRequestHandler):
    """POST/GET /mcp -> 307 to /target/mcp; anything else 404. Records (path, body) of every request."""

    hits: list[tuple[str, bytes]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.hits.append((self.path, body))
        if self.path == "/mcp":
            self.send_response(307)
            self.send_header("Location", "/target/mcp")
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, Any]]:
    server = MCPServer("loopback-echo", version="1.0")

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text."""
        return text

    port = free_port()
    mcp = uvicorn.Server(uvicorn.Config(server.streamable_http_app(), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=mcp.run, daemon=True)
    thread.start()
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    redirect = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    for s in (plain, redirect):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    deadline = time.time() + 20
    while not mcp.started:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.05)
    yield {"mcp": f"http://127.0.0.1:{port}/mcp", "mcp_port": port,
           "plain": f"http://127.0.0.1:{plain.server_address[1]}/mcp",
           "redirect": f"http://127.0.0.1:{redirect.server_address[1]}/mcp", "hits": _Counting.hits}
    mcp.should_exit = True
    for s in (plain, redirect):
        s.shutdown()
    thread.join(timeout=10)


def _settings(tmp_path: Path, **policy: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", poll_interval_s=0.1, start_worker=False, **policy)


def _test_mcp(live: Any, url: str) -> httpx.Response:
    with live.client(live.key()) as client:
        return client.post("/tools/test-mcp", json={"mcp_url": url})


# ---- the policy's rules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("address, category", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("::127.0.0.1", "loopback"), ("64:ff9b::7f00:1", "loopback"),
    ("2002:7f00:1::", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("100.64.0.1", "shared"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "private"),
])
def test_non_public_addresses_are_denied_by_default(address, category):
    from runrl_engine.netpolicy import DestinationPolicy, address_category

    assert address_category(ipaddress.ip_address(address)).startswith(category)
    refusal = DestinationPolicy(hint="set X").refusal(address, 80, address)
    assert refusal is not None and category in str(refusal) and str(refusal).endswith("set X")
    assert DestinationPolicy(allow_private=True).refusal(address, 80, address) is None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address):
    from runrl_engine.netpolicy import DestinationPolicy

    assert DestinationPolicy().refusal(address, 443, address) is None


def test_allow_entries_cidr_host_port_and_names():
    from runrl_engine.netpolicy import DestinationDenied, DestinationPolicy, parse_destination

    policy = DestinationPolicy(allowed=("127.0.0.1:8765", "10.1.0.0/16", "[::1]:9000", "fd00::/8",
                                        "mcp.internal", "localhost:8765"))
    assert policy.refusal("127.0.0.1", 8765, "127.0.0.1") is None
    assert policy.refusal("127.0.0.1", 8766, "127.0.0.1") is not None  # other loopback ports stay closed
    assert policy.refusal("::ffff:127.0.0.1", 8765, "::ffff:127.0.0.1") is None  # mapped form matches
    assert policy.refusal("10.1.200.3", 5, "10.1.200.3") is None and policy.refusal("10.2.0.1", 5, "10.2.0.1")
    assert policy.refusal("::1", 9000, "::1") is None and policy.refusal("::1", 9001, "::1") is not None
    assert policy.refusal("fd12::5", 1, "fd12::5") is None
    assert policy.allows_name("MCP.Internal.", 1234) and policy.allows_name("localhost", 8765)
    assert not policy.allows_name("localhost", 8766)
    with pytest.raises(DestinationDenied, match="resolves to a loopback address"):
        policy.check_addresses("db.example", 80, ["8.8.8.8", "127.0.0.1"])  # every address must pass
    policy.check_addresses("example.com", 80, ["8.8.8.8", "2001:4860:4860::8888"])
    for bad in ["", "x y", "1.2.3.4:0", "1.2.3.4:99999", "10.0.0.0/33", "[::1", "http://host:1/mcp", "a:b"]:
        with pytest.raises(ValueError):
            parse_destination(bad)


def test_engine_config_keys_default_and_validation():
    from runrl_engine.config import RunConfig
    from runrl_engine.errors import ConfigError

    base = {"model": "m", "prompt_file": "p", "reward_file": "r"}
    cfg = RunConfig.from_dict(base)
    assert cfg.tool_allow_private_destinations is True and cfg.tool_allowed_destinations == []
    with pytest.raises(ConfigError, match="tool_allowed_destinations"):
        RunConfig.from_dict({**base, "tool_allowed_destinations": ["not a host"]})


# ---- POST /tools/test-mcp and registration ------------------------------------------------------------------

def test_loopback_mcp_refused_by_default_and_allowed_by_entry(make_live, tmp_path, targets):
    live = make_live(_settings(tmp_path / "a"))
    for url in (targets["mcp"], "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]:1/mcp",
                "http://10.0.0.1/mcp", "http://0.0.0.0:80/mcp"):
        res = _test_mcp(live, url)
        assert res.status_code == 422, (url, res.text)
        body = res.json()
        assert body["success"] is False and body["error"] == "validation_error"
        assert "allowed_destinations" in body["details"]["mcp_url"] and "allow_private_destinations" in \
            body["details"]["mcp_url"]
    with live.client(live.key()) as client:
        res = client.post("/tools", json={"name": "t", "mcp_url": targets["mcp"]})
        assert res.status_code == 422 and "mcp_url" in res.json()["details"]
        assert client.get("/tools").json()["data"]["items"] == []
        # a name that does not resolve is accepted at registration (the connect-time check still applies)
        made = client.post("/tools", json={"name": "later", "mcp_url": "http://mcp.example.invalid/mcp"})
        assert made.status_code == 201, made.text
        res = client.put(f"/tools/{made.json()['data']['id']}", json={"mcp_url": "http://127.0.0.1:9/mcp"})
        assert res.status_code == 422 and "mcp_url" in res.json()["details"]

    allowed = make_live(_settings(tmp_path / "b", allowed_destinations=(f"127.0.0.1:{targets['mcp_port']}",)))
    report = _test_mcp(allowed, targets["mcp"]).json()["data"]
    assert report["ok"] is True and [t["name"] for t in report["tools"]] == ["echo"], report
    # the entry opens that port only: users still cannot probe other loopback ports
    assert _test_mcp(allowed, targets["plain"]).status_code == 422
    with allowed.client(allowed.key()) as client:
        assert client.post("/tools", json={"name": "t", "mcp_url": targets["mcp"]}).status_code == 201

    everything = make_live(_settings(tmp_path / "c", allow_private_destinations=True))
    assert _test_mcp(everything, targets["mcp"]).json()["data"]["ok"] is True


def test_closed_port_and_non_mcp_server_give_the_same_error(make_live, tmp_path, targets):
    live = make_live(_settings(tmp_path, allow_private_destinations=True))
    closed = f"http://127.0.0.1:{free_port()}/mcp"
    https_to_http = targets["mcp"].replace("http://", "https://")  # a TLS handshake with a plain-HTTP server
    messages = {}
    for url in (closed, targets["plain"], https_to_http, "http://mcp.example.invalid/mcp"):
        res = _test_mcp(live, url)
        assert res.status_code == 200, res.text
        report = res.json()["data"]
        assert report["ok"] is False and report["tools"] == []
        messages[url] = report["error"].replace(url, "<url>")
    assert len(set(messages.values())) == 1, messages
    assert next(iter(messages.values())).startswith("could not complete an MCP handshake with <url>")


def test_redirect_is_not_followed_and_the_body_not_replayed(make_live, tmp_path, targets):
    live = make_live(_settings(tmp_path, allow_private_destinations=True))
    targets["hits"].clear()
    report = _test_mcp(live, targets["redirect"]).json()["data"]
    assert report["ok"] is False and "redirect" in report["error"] and "register the final URL" in report["error"]
    paths = [path for path, _ in targets["hits"]]
    assert paths.count("/mcp") == 1 and b"initialize" in targets["hits"][0][1]
    assert "/target/mcp" not in paths, targets["hits"]  # the redirect target never got the POST body


# ---- runs: the server forces the policy into the trainer's config ----------------------------------------------

def test_runs_get_the_servers_policy_not_the_requests(make_live, tmp_path, targets):
    port = targets["mcp_port"]
    live = make_live(_settings(tmp_path, allowed_destinations=(f"127.0.0.1:{port}",)))
    with live.client(live.key()) as client:
        tool = client.post("/tools", json={"name": "echo", "mcp_url": targets["mcp"]}).json()["data"]
        prompt = client.post("/files", json={"name": "p", "content": PROMPTS, "type": "prompt"}).json()["data"]
        reward = client.post("/files", json={"name": "r", "content": REWARD,
                                             "type": "reward_function"}).json()["data"]
        res = client.post("/runs", json={"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": prompt["id"],
                                         "reward_file_id": reward["id"], "tool_ids": [tool["id"]],
                                         "tool_allow_private_destinations": True,
                                         "tool_allowed_destinations": ["0.0.0.0/0"]})
        assert res.status_code == 201, res.text
    svc = live.app.state.services
    run = svc.store.run(res.json()["data"]["id"])
    assert run["config"]["tool_allow_private_destinations"] is False
    assert run["config"]["tool_allowed_destinations"] == [f"127.0.0.1:{port}"]
    # a run queued under an older, looser policy gets today's when the worker starts it
    run = {**run, "config": {**run["config"], "tool_allow_private_destinations": True,
                             "tool_allowed_destinations": ["0.0.0.0/0"]}}
    path = svc.worker._prepare(run, tmp_path / "run")
    written = yaml.safe_load(path.read_text())
    assert written["tool_allow_private_destinations"] is False
    assert written["tool_allowed_destinations"] == [f"127.0.0.1:{port}"]


def test_engine_client_refuses_at_connect_time(targets):
    """No registration check in between: the trainer's MCP client itself refuses, on the resolved address."""
    from runrl_engine.netpolicy import DestinationPolicy
    from runrl_engine.tools.mcp_client import ToolRuntime, handshake

    port = targets["mcp_port"]
    denied = DestinationPolicy(hint="see tool_allowed_destinations")
    via_name = f"http://localhost:{port}/mcp"  # a name, resolved at connect time to loopback
    for url in (targets["mcp"], via_name):
        report = handshake(url, timeout_s=5, policy=denied)
        assert report["ok"] is False and "loopback" in report["error"] and "tool_allowed_destinations" in \
            report["error"], report
    with ToolRuntime(policy=denied) as runtime:
        session = runtime.open_session([via_name], connect_timeout_s=5)
        assert session.tools() == [] and "refused" in session.connection_errors[via_name]
        result = session.call("echo", {"text": "hi"})
        assert result.is_error and "refused" in result.text
        session.close()
    allowed = DestinationPolicy(allowed=(f"127.0.0.1:{port}",))
    with ToolRuntime(policy=allowed) as runtime:
        session = runtime.open_session([targets["mcp"]], connect_timeout_s=5)
        assert session.call("echo", {"text": "hi"}).text == "hi"
        session.close()


# ---- the httpx transports, for other senders (webhooks) --------------------------------------------------------

def test_httpx_transports_refuse_denied_destinations_and_redirects(targets):
    from runrl_engine.netpolicy import (AsyncGuardedTransport, DestinationDenied, DestinationPolicy,
                                        GuardedTransport, RedirectRefused)

    plain_port = int(targets["plain"].rsplit(":", 1)[1].split("/")[0])
    base = f"http://127.0.0.1:{plain_port}/"
    with httpx.Client(transport=GuardedTransport(DestinationPolicy()), trust_env=False) as client:
        with pytest.raises(DestinationDenied):
            client.get(base)
    allowed = DestinationPolicy(allowed=(f"127.0.0.1:{plain_port}", targets["redirect"].split("/")[2]))
    with httpx.Client(transport=GuardedTransport(allowed), trust_env=False) as client:
        assert client.get(base).status_code == 200
        with pytest.raises(RedirectRefused):
            client.post(targets["redirect"], content=b"payload", follow_redirects=True)

    async def async_checks() -> None:
        async with httpx.AsyncClient(transport=AsyncGuardedTransport(DestinationPolicy()), trust_env=False) as c:
            with pytest.raises(DestinationDenied):
                await c.get(base)
        async with httpx.AsyncClient(transport=AsyncGuardedTransport(allowed), trust_env=False) as c:
            assert (await c.get(base)).status_code == 200

    asyncio.run(async_checks())
    assert all(path != "/target/mcp" for path, _ in targets["hits"])


def test_settings_defaults_are_the_safe_ones(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.allow_private_destinations is False and settings.allowed_destinations == ()
