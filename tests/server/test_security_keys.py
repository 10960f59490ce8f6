"""Issue 16 finding 8 against a real server: what a non-admin key may do to keys (no quota raise, no reactivation,
no key with more scopes, a higher quota or a later expiry than its own), the per-address throttle of failed
authentications, and `/health` counting only the caller's own runs."""

from __future__ import annotations

from dataclasses import replace

from server.store import now_iso


def _key_id(c, name: str) -> int:
    return next(k["id"] for k in c.get("/keys").json()["data"] if k["name"] == name)


def _forbidden(r, field: str) -> None:
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["success"] is False and body["error"] == "forbidden" and field in body["details"], body


def test_a_write_key_cannot_raise_quotas_reactivate_or_mint_bigger_keys(live):
    writer = live.client(live.key("alice", scopes="read,write", name="writer"))
    admin = live.client(live.key("alice", scopes="read,write,admin", name="admin"))
    own = _key_id(writer, "writer")

    _forbidden(writer.put(f"/keys/{own}", json={"requests_per_hour": 10_000_000}), "requests_per_hour")
    r = writer.put(f"/keys/{own}", json={"requests_per_hour": 100})  # lowering its own quota is fine
    assert r.status_code == 200 and r.json()["data"]["requests_per_hour"] == 100
    _forbidden(writer.put(f"/keys/{own}", json={"requests_per_hour": 101}), "requests_per_hour")

    # a new key gets min(default, the creator's own quota) and may not ask for more, nor for more scopes
    made = writer.post("/keys", json={"name": "child", "scopes": ["read"]})
    assert made.status_code == 201 and made.json()["data"]["api_key"]["requests_per_hour"] == 100
    _forbidden(writer.post("/keys", json={"name": "big", "scopes": ["read"], "requests_per_hour": 5000}),
               "requests_per_hour")
    _forbidden(writer.post("/keys", json={"name": "adm", "scopes": ["admin"]}), "scopes")
    child_id, child_token = made.json()["data"]["api_key"]["id"], made.json()["data"]["token"]

    # a revoked sibling stays revoked; a lowered quota stays lowered
    assert writer.put(f"/keys/{child_id}", json={"active": False}).status_code == 200
    _forbidden(writer.put(f"/keys/{child_id}", json={"active": True}), "active")
    assert live.client(child_token).get("/files").status_code == 401
    assert writer.put(f"/keys/{child_id}", json={"requests_per_hour": 50}).status_code == 200
    _forbidden(writer.put(f"/keys/{child_id}", json={"requests_per_hour": 80}), "requests_per_hour")
    assert writer.put(f"/keys/{child_id}", json={"active": False, "name": "renamed"}).status_code == 200  # no-op

    # expiry: a key cannot outlive its creator, and only admin extends one
    dated = writer.post("/keys", json={"name": "dated", "scopes": ["read"], "expires_at": "2099-01-01"})
    dated_id = dated.json()["data"]["api_key"]["id"]
    _forbidden(writer.put(f"/keys/{dated_id}", json={"expires_at": None}), "expires_at")
    _forbidden(writer.put(f"/keys/{dated_id}", json={"expires_at": "2100-01-01"}), "expires_at")
    assert writer.put(f"/keys/{dated_id}", json={"expires_at": "2098-01-01"}).status_code == 200
    expiring = admin.post("/keys", json={"name": "expiring", "scopes": ["read", "write"],
                                         "expires_at": "2099-01-01"}).json()["data"]["token"]
    with live.client(expiring) as c:
        r = c.post("/keys", json={"name": "heir", "scopes": ["read"]})
        assert r.status_code == 201 and r.json()["data"]["api_key"]["expires_at"] == "2099-01-01T00:00:00Z"
        _forbidden(c.post("/keys", json={"name": "heir2", "scopes": ["read"], "expires_at": "2100-01-01"}),
                   "expires_at")
        _forbidden(c.post("/keys", json={"name": "heir3", "scopes": ["read"], "expires_at": None}), "expires_at")

    # admin may do all of it
    r = admin.put(f"/keys/{child_id}", json={"active": True, "requests_per_hour": 10_000_000})
    assert r.status_code == 200 and r.json()["data"]["active"] is True
    assert live.client(child_token).get("/files").status_code == 200
    assert admin.put(f"/keys/{own}", json={"requests_per_hour": 10_000_000}).status_code == 200
    big = admin.post("/keys", json={"name": "big", "scopes": ["read"], "requests_per_hour": 20_000})
    assert big.status_code == 201 and big.json()["data"]["api_key"]["requests_per_hour"] == 20_000
    assert admin.put(f"/keys/{dated_id}", json={"expires_at": None}).status_code == 200


def test_failed_authentications_are_throttled_per_address(make_live, settings):
    live = make_live(replace(settings, auth_failures_per_minute=3))
    good = live.key("alice", name="good")
    with live.client(good) as c:
        revoked = c.post("/keys", json={"name": "revoked", "scopes": ["read"]}).json()["data"]
        assert c.put(f"/keys/{revoked['api_key']['id']}", json={"active": False}).status_code == 200
    wrong = "rl_aaaaaaaa_" + "b" * 32
    for token in (wrong, "rl_short_x", revoked["token"]):  # three failures of three kinds: each answered 401
        with live.client(token) as c:
            assert c.get("/files").status_code == 401
    for token in (wrong, revoked["token"]):  # over the limit: 429, and no more reasons (inactive, unknown...)
        with live.client(token) as c:
            r = c.get("/files")
            assert r.status_code == 429, r.text
            body = r.json()
            assert body["error"] == "rate_limit_exceeded" and "inactive" not in body["message"]
            assert 0 < body["retry_after"] == body["details"]["retry_after"] <= 60
            assert 0 < int(r.headers["Retry-After"]) <= 60
    with live.client(good) as c:  # a valid key from the same address keeps working
        assert c.get("/files").status_code == 200
    with live.client(None) as c:  # no key at all is not an authentication failure
        assert c.get("/files").status_code == 401


def test_health_counts_only_the_callers_runs(make_live, settings):
    live = make_live(replace(settings, start_worker=False))  # the inserted runs stay where they are
    alice = live.client(live.key("alice"))
    bob = live.client(live.key("bob"))
    root = live.client(live.key("root", scopes="read,admin"))
    store = live.app.state.services.store
    uid = store.get_or_create_user("bob")
    for status in ("PENDING", "PENDING", "RUNNING"):
        store.insert("runs", {"user_id": uid, "status": status, "type": "reward_function", "model": "builtin:tiny",
                              "parameters": {}, "config": {}, "created_at": now_iso(), "updated_at": now_iso()})
    assert alice.get("/health").json()["data"]["queue"] == {}
    assert bob.get("/health").json()["data"]["queue"] == {"PENDING": 2, "RUNNING": 1}
    data = root.get("/health").json()["data"]
    assert data["queue"] == {"PENDING": 2, "RUNNING": 1} and data["slots"] == live.settings.slots
