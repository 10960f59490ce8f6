"""Every API route × (no key → 401, a key without the route's scope → 403, another user's resource → 404)."""

from __future__ import annotations

import re

from starlette.routing import Mount

from tests.server.conftest import PROMPTS, REWARD


def api_routes(app):
    mount = next(r for r in app.routes if isinstance(r, Mount))
    for route in mount.routes:
        for method in sorted(route.methods - {"HEAD"}):
            yield method, route.path, route.endpoint.required_scope


def test_every_route_checks_key_and_scope(live):
    routes = list(api_routes(live.app))
    assert len(routes) >= 45
    keys = {"read": live.key(scopes="read"), "write": live.key(scopes="write")}
    clients = {name: live.client(token) for name, token in keys.items()}
    anon = live.client(None)
    for method, path, scope in routes:
        url = re.sub(r"\{[^}]+\}", "1", path)
        r = anon.request(method, url)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "unauthorized"
        if scope == "any":
            continue
        other = "write" if scope == "read" else "read"
        r = clients[other].request(method, url, json={})
        assert r.status_code == 403, (method, path, r.status_code)
        assert r.json()["details"] == {"required_scope": scope}


def test_another_users_resources_are_404(live):
    alice = live.client(live.key("alice", scopes="read,write"))
    bob = live.client(live.key("bob", scopes="read,write,admin"))
    ids = {
        "file_id": alice.post("/files", json={"type": "prompt", "name": "p", "content": PROMPTS}).json()["data"]["id"],
        "key_id": alice.get("/keys").json()["data"][0]["id"],
        "tool_id": alice.post("/tools", json={"name": "t", "mcp_url": "https://tools.example/mcp"}).json()["data"]["id"],
        "uuid": alice.post("/shared-configurations", json={"name": "c", "visibility": "private"}).json()["data"]["uuid"],
    }
    reward = alice.post("/files", json={"type": "reward_function", "name": "r", "content": REWARD}).json()["data"]
    ids["run_id"] = alice.post("/runs", json={
        "model": "builtin:tiny", "type": "reward_function", "prompt_file_id": ids["file_id"],
        "reward_file_id": reward["id"], "completion_length": 128, "run_name": "sleep=0,code=0"}).json()["data"]["id"]
    ids["deployment_id"] = live.app.state.services.store.insert("deployments", {
        "user_id": 1, "run_id": ids["run_id"], "base_model": "builtin:tiny", "status": "failed",
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"})
    assert alice.get(f"/deployments/{ids['deployment_id']}").status_code == 200
    checked = 0
    for method, path, _ in api_routes(live.app):
        params = re.findall(r"\{([^}]+)\}", path)
        if not params or any(p not in ids for p in params):
            continue
        url = path
        for p in params:
            url = url.replace("{" + p + "}", str(ids[p]))
        r = bob.request(method, url, json={"name": "x"})
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        checked += 1
    assert checked >= 29
    # and nothing of alice's changed
    assert alice.get(f"/files/{ids['file_id']}").status_code == 200
    assert alice.get(f"/tools/{ids['tool_id']}").json()["data"]["name"] == "t"
    assert alice.get(f"/shared-configurations/{ids['uuid']}").json()["data"]["name"] == "c"
