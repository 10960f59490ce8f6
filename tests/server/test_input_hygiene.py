"""Input hygiene (issue 16, findings 4, 5 and 10) against a real uvicorn server on loopback.

- 4: strings that cannot be encoded (lone surrogates) are refused with a 422 before anything is stored, in JSON
  keys and values and in multipart fields and file names; a surrogate already in the store cannot break reads.
- 5: request bodies are capped before parsing: a Content-Length over the cap is refused before a byte is read, and
  a streamed (chunked) body is refused with 413 as soon as it passes the cap, with the server's memory bounded;
  multipart uploads too, before they are spooled.
- 10: bad numbers and ids (`²`, 10**30, year 1 with an offset, 200 k-deep JSON, ...) answer 404/422, never 500, and
  the connection stays alive after an error, even an internal one. A write that fails leaves no row and no file.
"""

from __future__ import annotations

import json
import select
import socket
import sqlite3
import time
from dataclasses import replace
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.server.conftest import PROMPTS, REWARD, LiveServer, start_server

BIG = 10**30
SURROGATE = "\ud800"
MiB = 1024 * 1024


def raw(body: Any) -> dict[str, Any]:
    """httpx kwargs for a JSON body that may hold lone surrogates (json.dumps escapes them as `\\ud800`)."""
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def addr(response: httpx.Response) -> Any:
    """The client-side address of the connection that carried `response` (the same address = kept alive)."""
    return response.extensions["network_stream"].get_extra_info("client_addr")


def vm_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def upload(c: httpx.Client) -> tuple[str, str]:
    p = c.post("/files", json={"type": "prompt", "name": "p", "content": PROMPTS}).json()["data"]["id"]
    r = c.post("/files", json={"type": "reward_function", "name": "r", "content": REWARD}).json()["data"]["id"]
    return p, r


def run_body(p: str, r: str, **extra: Any) -> dict[str, Any]:
    return {"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": p, "reward_file_id": r,
            "completion_length": 128, **extra}


# ---- a raw HTTP/1.1 client: httpx cannot show *when* the server answered a body it is still sending ----------

def _read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += part
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        part = sock.recv(65536)
        if not part:
            break
        rest += part
    return int(lines[0].split()[1]), json.loads(rest[:length])


def stream_until_answered(live: LiveServer, token: str, path: str, content_type: str, head: bytes,
                          limit: int) -> tuple[int, dict[str, Any], int, bool, bool]:
    """POST a chunked body (`head`, then filler) until the server answers or `limit` bytes went out.

    Returns (status, body, bytes sent, whether the server answered before the body was complete, whether the
    server then closed the connection rather than read on)."""
    url = urlsplit(live.url)
    sock = socket.create_connection((url.hostname, url.port))
    sock.settimeout(10)
    sock.sendall(f"POST {url.path}{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    filler = b"a" * 65536
    frame = b"%x\r\n%s\r\n" % (len(filler), filler)
    sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
    sent, early = len(head), False
    try:
        while sent < limit:
            if select.select([sock], [], [], 0)[0]:
                early = True
                break
            sock.sendall(frame)
            sent += len(filler)
        if not early:
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        early = True  # the server stopped reading
    status, body = _read_response(sock)
    try:
        for _ in range(256):  # 16 MiB more: a server that still reads takes it all
            sock.sendall(frame)
        closed = False
    except OSError:
        closed = True
    sock.close()
    return status, body, sent, early, closed


def send_headers_only(live: LiveServer, token: str, path: str, content_type: str, length: int) -> tuple[int, Any]:
    """Announce a `length`-byte body and send none of it: a server that waits for it never answers."""
    url = urlsplit(live.url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(f"POST {url.path}{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n".encode())
        sock.settimeout(5)
        try:
            return _read_response(sock)
        except socket.timeout:
            return 0, "no answer within 5 s: the server is waiting for the body"


# ---- finding 4: lone surrogates -------------------------------------------------------------------------------

def test_surrogates_are_refused_before_anything_is_stored(live):
    alice, bob = live.key("alice"), live.key("bob")
    with live.client(alice) as c, live.client(bob) as b:
        p, r = upload(c)
        files_before = sorted(f.name for f in live.settings.files_dir.iterdir())
        content_before = c.get(f"/files/{r}/content").json()["data"]["content"]
        cases = [
            ("POST", "/shared-configurations", {"name": "x", "visibility": "public",
                                                "configuration": {"model": SURROGATE}}, "configuration.model"),
            ("POST", "/shared-configurations", {"name": "x", "visibility": "public",
                                                "configuration": {SURROGATE: 1}}, "configuration"),
            ("POST", "/runs", run_body(p, r, run_name=f"run {SURROGATE}"), "run_name"),
            ("POST", "/runs", run_body(p, r, package_requirements=["a", SURROGATE]), "package_requirements[1]"),
            ("POST", "/files", {"type": "prompt", "name": f"n{SURROGATE}", "content": PROMPTS}, "name"),
            ("POST", "/files", {"type": "prompt", "name": "n", "content": PROMPTS + SURROGATE}, "content"),
            ("PUT", f"/files/{r}", {"content": REWARD + f"# {SURROGATE}\n"}, "content"),
            ("PUT", f"/files/{r}", {"name": SURROGATE, "content": "x = 1\n"}, "name"),
            ("POST", "/keys", {"name": SURROGATE}, "name"),
            ("POST", "/tools", {"name": "t", "mcp_url": "http://127.0.0.1:9/mcp", "description": SURROGATE},
             "description"),
        ]
        for method, path, body, where in cases:
            resp = c.request(method, path, **raw(body))
            assert resp.status_code == 422, (path, body, resp.text)
            error = resp.json()
            assert error["error"] == "validation_error" and any(k.startswith(where) for k in error["details"]), error
            assert "surrogate" in json.dumps(error["details"])
        # nothing was stored: no run, no new file, no shared configuration, content unchanged; every read works
        assert c.get("/runs").json()["data"]["pagination"]["total"] == 0
        assert sorted(f.name for f in live.settings.files_dir.iterdir()) == files_before
        assert c.get(f"/files/{r}/content").json()["data"]["content"] == content_before
        assert b.get("/shared-configurations/browse").status_code == 200
        assert c.get("/shared-configurations").json()["data"] == []
        assert len(c.get("/keys").json()["data"]) == 1 and c.get("/search", params={"q": "run"}).status_code == 200
        # URLs cannot carry one (percent-decoding replaces bad UTF-8), and never 500
        assert c.get("/files?search=%ED%A0%80").status_code == 200
        assert c.get("/runs/%ED%A0%80").status_code == 404


def test_surrogates_in_multipart_fields_and_file_names_are_refused(live):
    """A multipart body may name a charset; `unicode_escape` turns `\\ud800` into a lone surrogate."""
    with live.client(live.key()) as c:
        for name, filename in ((b"n\\ud800", b"p.jsonl"), (b"n", b"p\\ud800.jsonl")):
            body = (b"--B\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\nprompt\r\n"
                    b"--B\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n" + name + b"\r\n"
                    b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename + b"\"\r\n"
                    b"Content-Type: application/octet-stream\r\n\r\n" + PROMPTS.encode() + b"\r\n--B--\r\n")
            resp = c.post("/files", content=body,
                          headers={"Content-Type": "multipart/form-data; boundary=B; charset=unicode_escape"})
            assert resp.status_code == 422 and "surrogate" in resp.text, resp.text
        assert list(live.settings.files_dir.iterdir()) == []
        assert c.get("/files").json()["data"]["items"] == []


def test_a_stored_surrogate_does_not_break_reads(live):
    """Rows written before this check existed: the envelope renderer never raises on output."""
    alice, bob = live.key("alice"), live.key("bob")
    with live.client(alice) as c, live.client(bob) as b:
        p, r = upload(c)
        shared = c.post("/shared-configurations", json={"name": "s", "visibility": "public",
                                                         "configuration": {"model": "m"}}).json()["data"]
        run = c.post("/runs", json=run_body(p, r, run_name="sleep=30,code=0")).json()["data"]
        db = sqlite3.connect(live.settings.db_path)
        db.execute("UPDATE shared_configs SET configuration = ? WHERE uuid = ?", ('{"model": "\\ud800"}',
                                                                                  shared["uuid"]))
        db.execute("UPDATE runs SET parameters = ? WHERE id = ?", ('{"run_name": "\\ud800"}', run["id"]))
        db.commit()
        db.close()
        assert b.get("/shared-configurations/browse").status_code == 200
        assert b.get(f"/shared-configurations/{shared['uuid']}").status_code == 200
        assert c.get("/runs").status_code == 200 and c.get(f"/runs/{run['id']}").status_code == 200
        assert c.get("/search", params={"q": str(run["id"])}).status_code == 200
        assert c.post(f"/runs/{run['id']}/cancel").status_code == 200
        assert c.delete(f"/shared-configurations/{shared['uuid']}").status_code == 200


# ---- finding 5: body caps ---------------------------------------------------------------------------------------

STREAMS = [  # (path, content type, head of the body, which cap)
    ("/keys", "application/json", b'{"name": "', "max_json_bytes"),
    ("/shared-configurations", "application/json", b'{"name": "x", "description": "', "max_json_bytes"),
    ("/files", "application/json", b'{"type": "prompt", "name": "n", "content": "', "max_upload_bytes"),
    ("/files", "multipart/form-data; boundary=B",
     b"--B\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\nprompt\r\n"
     b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.jsonl\"\r\n\r\n", "max_upload_bytes"),
]


@pytest.fixture
def capped(make_live, settings) -> LiveServer:
    return make_live(replace(settings, max_json_bytes=256 * 1024, max_upload_bytes=MiB))


@pytest.mark.parametrize("path,ctype,head,cap", STREAMS, ids=["keys", "shared", "files-json", "files-multipart"])
def test_streamed_body_is_refused_once_over_the_cap(capped, path, ctype, head, cap):
    token = capped.key()
    rss = vm_rss_mib()
    status, body, sent, early, closed = stream_until_answered(capped, token, path, ctype, head, limit=64 * MiB)
    growth = vm_rss_mib() - rss
    limit = getattr(capped.settings, cap)
    assert early, f"the server read all {sent / MiB:.0f} MiB before answering {status} {body}"
    assert closed, "the server kept reading the body after answering"
    assert status == 413 and body["error"] == "payload_too_large" and body["details"] == {
        "body": f"at most {limit + (MiB if cap == 'max_upload_bytes' else 0)} bytes"}, body
    assert growth < 50, f"server memory grew {growth:.0f} MiB"
    with capped.client(token) as c:  # nothing stored, the server still answers
        assert c.get("/files").json()["data"]["items"] == [] and len(c.get("/keys").json()["data"]) == 1
    assert list(capped.settings.files_dir.iterdir()) == []


@pytest.mark.parametrize("path,ctype", [("/keys", "application/json"), ("/files", "multipart/form-data; boundary=B"),
                                        ("/runs", "application/json")])
def test_content_length_over_the_cap_is_refused_before_reading(capped, path, ctype):
    status, body = send_headers_only(capped, capped.key(), path, ctype, 10 * 1024**3)
    assert status == 413 and body["error"] == "payload_too_large", body


def test_bodies_under_the_cap_still_work(capped):
    with capped.client(capped.key()) as c:
        assert c.post("/keys", json={"name": "k" * 200_000}).status_code == 201
        assert c.post("/files", files={"file": ("p.jsonl", b"x" * MiB)}, data={"type": "prompt"}).status_code == 201
        r = c.post("/files", json={"type": "reward_function", "name": "n", "content": "y" * (MiB + 1)})
        assert r.status_code == 422 and "too large" in r.json()["message"]  # the file cap, not the body cap


# ---- finding 10: numbers, ids, depth --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[tuple[LiveServer, str]]:
    from server.settings import Settings
    live = start_server(Settings(data_dir=tmp_path_factory.mktemp("hygiene") / "data", start_worker=False))
    yield live, live.key()
    live.stop()


FILES = {"prompt_file_id": "00000000-0000-0000-0000-000000000000", "reward_file_id": "x"}
DEEP = "[" * 200_000 + "]" * 200_000
BAD_INPUT = [  # (method, path, JSON body or raw bytes, expected status, a details key the answer must name)
    *[("GET", f"/runs/{i}{s}", None, 404, None) for i in ("²", BIG, "-1", "1e3", "٣")
      for s in ("", "/history", "/logs", "/metrics", "/completions")],
    ("POST", f"/runs/{BIG}/cancel", None, 404, None), ("GET", "/runs/²/logs/stream", None, 404, None),
    ("GET", "/tools/²", None, 404, None), ("GET", f"/tools/{BIG}", None, 404, None),
    ("PUT", f"/tools/{BIG}", {"name": "x"}, 404, None), ("DELETE", f"/tools/{BIG}", None, 404, None),
    ("GET", f"/deployments/{BIG}", None, 404, None), ("DELETE", "/deployments/²", None, 404, None),
    ("POST", f"/deployments/{BIG}/v1/chat/completions", {}, 404, None),
    ("GET", "/deployments/²/v1/models", None, 404, None),
    ("PUT", f"/keys/{BIG}", {"name": "x"}, 404, None), ("DELETE", "/keys/²", None, 404, None),
    ("GET", f"/keys/{BIG}/usage", None, 404, None),
    *[("GET", f"{p}?page={BIG}", None, 422, "page") for p in ("/runs", "/files", "/tools", "/deployments",
                                                               "/shared-configurations/browse")],
    ("GET", f"/runs?per_page={BIG}", None, 422, "per_page"), ("GET", f"/search?q=x&limit={BIG}", None, 422, "limit"),
    ("GET", f"/files?page={'9' * 5000}", None, 422, "page"),
    ("POST", "/runs", {**FILES, "max_steps": BIG}, 422, "max_steps"),
    ("POST", "/runs", {**FILES, "tool_ids": [1, BIG]}, 422, "tool_ids[1]"),
    ("POST", "/runs", {**FILES, "epochs": -BIG}, 422, "epochs"),
    ("POST", "/deployments", {"run_id": BIG}, 422, "run_id"),
    ("POST", "/deployments/check", {"run_id": BIG}, 422, "run_id"),
    ("POST", "/keys", {"name": "k", "requests_per_hour": BIG}, 422, "requests_per_hour"),
    ("POST", "/keys", {"name": "k", "expires_at": "0001-01-01T00:00:00+05:00"}, 422, "expires_at"),
    ("POST", "/keys", {"name": "k", "expires_at": "9999-12-31T23:59:59-05:00"}, 422, "expires_at"),
    ("POST", "/shared-configurations", {"name": "s", "configuration": {"max_steps": BIG}}, 422,
     "configuration.max_steps"),
    ("POST", "/tools", {"name": "t", "mcp_url": "http://h/mcp", "x": [{"y": BIG}]}, 422, "x[0].y"),
    ("POST", "/keys", b'{"name": "k", "n": 1e999}', 422, "n"),
    ("POST", "/keys", b'{"name": "k", "n": ' + b"1" * 5000 + b"}", 400, None),
    ("POST", "/keys", b'{"name": "k", "n": NaN}', 400, None),
    ("POST", "/keys", b'{"name": "\xed\xa0\x80"}', 400, None),  # a surrogate as (invalid) UTF-8 bytes
    ("POST", "/runs", DEEP.encode(), 422, "body"),
    ("POST", "/keys", ('{"name": "k", "x": ' + "[" * 65 + "]" * 65 + "}").encode(), 422, "body"),
    ("POST", "/shared-configurations", b'{"name": "s", "configuration": ' + b'{"a": ' * 100_000 + b"1"
     + b"}" * 100_001, 422, "body"),
]


@pytest.mark.parametrize("method,path,body,status,where", BAD_INPUT,
                         ids=[f"{i:02d} {m} {p[:48]}" + (f" {str(b)[:40]}".replace("[", "(") if b else "")
                              for i, (m, p, b, *_) in enumerate(BAD_INPUT)])
def test_bad_numbers_and_ids_answer_404_or_422_and_keep_the_connection(srv, method, path, body, status, where):
    live, token = srv
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    with live.client(token) as c:
        resp = c.request(method, path, **kwargs)
        first = addr(resp)
        assert resp.status_code == status, resp.text[:500]
        error = resp.json()
        assert error["success"] is False and "Traceback" not in resp.text
        if where:
            assert where in error["details"], error
        after = c.get("/health")
        assert after.status_code == 200 and addr(after) == first, "the server dropped the connection"


def test_json_depth_at_the_limit_is_accepted(srv):
    live, token = srv
    with live.client(token) as c:
        nested = "[" * 63 + "]" * 63  # 64 levels with the body object itself
        resp = c.post("/keys", content=('{"name": "deep", "x": ' + nested + "}").encode(),
                      headers={"Content-Type": "application/json"})
        assert resp.status_code == 201, resp.text
        assert c.get(f"/keys/{2**63 - 1}/usage").status_code == 404  # the largest int64 id is looked up, not refused


def test_internal_error_keeps_the_connection_alive(live):
    """An unexpected exception (here a corrupt row) is a 500 envelope, and the connection is kept."""
    with live.client(live.key()) as c:
        uuid = c.post("/shared-configurations", json={"name": "s", "configuration": {}}).json()["data"]["uuid"]
        with sqlite3.connect(live.settings.db_path) as db:
            db.execute("UPDATE shared_configs SET configuration = '{corrupt' WHERE uuid = ?", (uuid,))
        resp = c.get(f"/shared-configurations/{uuid}")
        first = addr(resp)
        assert resp.status_code == 500 and resp.json() == {"success": False, "error": "internal_error",
                                                           "message": "Internal server error"}
        after = c.get("/health")
        assert after.status_code == 200 and addr(after) == first, "the server dropped the connection"


# ---- finding 4/10: a failed write leaves no row and no file -----------------------------------------------------

def test_failed_writes_leave_no_row_and_no_file(live):
    """Another process holds the database's write lock, so the row cannot be written: the bytes must not stay."""
    with live.client(live.key()) as c:
        p, r = upload(c)
        stored = {f.name: f.read_bytes() for f in live.settings.files_dir.iterdir()}
        blocker = sqlite3.connect(live.settings.db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            created = c.post("/files", json={"type": "prompt", "name": "new", "content": PROMPTS})
            replaced = c.put(f"/files/{r}", json={"content": "def reward_fn(completion, **kw):\n    return 0.0\n"})
            assert time.monotonic() - started > 4  # each waited out the busy timeout
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert created.status_code >= 500 and replaced.status_code >= 500, (created.text, replaced.text)
        assert {f.name: f.read_bytes() for f in live.settings.files_dir.iterdir()} == stored
        assert c.get(f"/files/{r}/content").json()["data"]["content"] == REWARD
        assert len(c.get("/files").json()["data"]["items"]) == 2
