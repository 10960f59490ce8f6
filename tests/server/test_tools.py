"""Tools CRUD through the SDK and `POST /tools/test-mcp` against real MCP servers on loopback (the official
`mcp` SDK's MCPServer under uvicorn, streamable HTTP and SSE)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Iterator

import pytest
import runrl
import uvicorn
from mcp.server.mcpserver import MCPServer
from runrl.exceptions import AuthorizationError, NotFoundError, ValidationError

from tests.server.conftest import free_port


@pytest.fixture
def settings(settings):
    """These tests use MCP servers on loopback, which the default destination policy refuses
    (tests/server/test_destinations.py is about that policy)."""
    return dataclasses.replace(settings, allow_private_destinations=True)


@pytest.fixture(scope="module")
def mcp_urls() -> Iterator[dict[str, str]]:
    def build() -> MCPServer:
        server = MCPServer("loopback-numbers", version="3.1")

        @server.tool()
        def double(x: int) -> int:
            """Double a number."""
            return 2 * x

        return server

    ports = {"http": free_port(), "sse": free_port()}
    apps = {"http": build().streamable_http_app(), "sse": build().sse_app()}
    servers = [uvicorn.Server(uvicorn.Config(apps[k], host="127.0.0.1", port=ports[k], log_level="warning"))
               for k in ("http", "sse")]

    async def serve_all() -> None:
        await asyncio.gather(*(s.serve() for s in servers))

    thread = threading.Thread(target=asyncio.run, args=(serve_all(),), daemon=True)
    thread.start()
    import time

    deadline = time.time() + 20
    while not all(s.started for s in servers):
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.05)
    yield {"http": f"http://127.0.0.1:{ports['http']}/mcp", "sse": f"http://127.0.0.1:{ports['sse']}/sse"}
    for s in servers:
        s.should_exit = True
    thread.join(timeout=10)


def test_test_mcp_handshake(live, mcp_urls):
    sdk = runrl.RunRLClient(api_key=live.key(), base_url=live.url)
    for transport, url in mcp_urls.items():
        res = sdk.tools.test_connection(url)
        assert res["ok"] is True and res["error"] is None, res
        assert res["server_info"]["name"] == "loopback-numbers" and res["protocol_version"]
        assert [t["name"] for t in res["tools"]] == ["double"]
        assert res["tools"][0]["inputSchema"]["properties"]["x"]["type"] == "integer"
        assert res["latency_ms"] > 0
    dead = sdk.tools.test_connection(f"http://127.0.0.1:{free_port()}/mcp")
    assert dead["ok"] is False and dead["error"]
    with pytest.raises(ValidationError):
        sdk.tools.test_connection("ftp://example.com/mcp")


def test_tools_crud_and_visibility(live, mcp_urls):
    alice = runrl.RunRLClient(api_key=live.key("alice"), base_url=live.url)
    bob = runrl.RunRLClient(api_key=live.key("bob"), base_url=live.url)
    admin = runrl.RunRLClient(api_key=live.key("root", scopes="admin"), base_url=live.url)
    private = alice.tools.create(name="numbers", mcp_url=mcp_urls["http"], description="doubles")
    assert private.owner_user_id and private.is_public is False and private.verified is False
    public = alice.tools.create(name="shared", mcp_url=mcp_urls["sse"], is_public=True)
    with pytest.raises(ValidationError):
        alice.tools.create(name="numbers", mcp_url=mcp_urls["http"])  # unique per owner
    bob.tools.create(name="numbers", mcp_url=mcp_urls["http"])  # another owner may reuse the name
    assert {t.name for t in alice.tools.list().items} == {"numbers", "shared"}
    assert [t.id for t in bob.tools.list(public_only=True).items] == [public.id]
    assert [t.name for t in bob.tools.list(owned_only=True).items] == ["numbers"]
    assert [t.id for t in alice.tools.list(search="doub").items] == [private.id]
    assert alice.tools.list(verified=True).items == []
    with pytest.raises(NotFoundError):
        bob.tools.get(private.id)
    assert bob.tools.get(public.id).name == "shared"
    with pytest.raises(AuthorizationError):
        bob.tools.update(public.id, name="mine")
    with pytest.raises(AuthorizationError):
        bob.tools.delete(public.id)
    updated = alice.tools.update(private.id, description="x2", is_public=True)
    assert updated.description == "x2" and updated.is_public
    admin.tools.delete(public.id)  # admins may remove any tool they can see
    with pytest.raises(NotFoundError):
        alice.tools.get(public.id)
    alice.tools.delete(private.id)
    assert [t.name for t in alice.tools.list().items] == []


def test_run_with_tools(live, mcp_urls):
    alice = runrl.RunRLClient(api_key=live.key("alice"), base_url=live.url)
    tool = alice.tools.create(name="numbers", mcp_url=mcp_urls["http"])
    p = alice.files.create_from_content(name="p", content='{"prompt": [{"role": "user", "content": "hi"}]}\n',
                                        file_type="prompt")
    env = ("class CustomEnv:\n    def setup(self, **kw):\n        pass\n"
           "    def step(self, action):\n        return {'observation': '', 'reward': 1.0, 'done': True}\n")
    e = alice.files.create_from_content(name="env", content=env, file_type="environment")
    run = alice.runs.create(model="builtin:tiny", type="environment", prompt_file_id=p.id, reward_file_id=e.id,
                            tool_ids=[tool.id], completion_length=128, run_name="sleep=0,code=0").initial
    assert run.uses_tools and run.tools[0]["mcp_url"] == mcp_urls["http"]
    assert live.app.state.services.store.run(run.id)["config"]["tools"] == [mcp_urls["http"]]
    assert alice.tools.get(tool.id).usage_count == 1
