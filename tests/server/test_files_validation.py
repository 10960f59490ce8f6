"""Files (SDK + plain HTTP) and validation on both path families."""

from __future__ import annotations

from dataclasses import replace

import pytest
import runrl
from runrl.exceptions import NotFoundError

from tests.server.conftest import PROMPTS, REWARD


def test_files_sdk_flow(live, tmp_path):
    sdk = runrl.RunRLClient(api_key=live.key(), base_url=live.url)
    path = tmp_path / "prompts.jsonl"
    path.write_text(PROMPTS)
    prompt = sdk.files.upload_path(str(path), file_type="prompt")
    assert prompt.name == "prompts.jsonl" and prompt.original_filename == "prompts.jsonl"
    assert prompt.file_size == len(PROMPTS.encode()) and prompt.mime_type == "application/jsonl"
    assert prompt.download_url.endswith(f"/api/v1/files/{prompt.id}/download")
    reward = sdk.files.create_from_content(name="My Reward", content=REWARD, file_type="reward_function",
                                           original_filename="reward.py")
    assert sdk.files.retrieve(reward.id).name == "My Reward"
    assert sdk.files.content(reward.id) == REWARD
    preview = sdk.files.preview(prompt.id, lines=2)
    assert preview["total_lines"] == 6 and preview["truncated"] and preview["lines"][0]["expected"] == "hi"
    listing = sdk.files.list(type="prompt")
    assert [f.id for f in listing.items] == [prompt.id] and listing.pagination["total"] == 1
    sdk.files.delete(reward.id)
    with pytest.raises(NotFoundError):
        sdk.files.retrieve(reward.id)  # soft-deleted files are hidden


def test_files_http(live, tmp_path):
    token = live.key()
    with live.client(token) as c:
        for i, (name, size) in enumerate((("b-file", 30), ("a-file", 10), ("c-file", 20))):
            r = c.post("/files", json={"type": "reward_function", "name": name, "content": "x" * size})
            assert r.status_code == 201
        names = lambda **q: [f["name"] for f in c.get("/files", params=q).json()["data"]["items"]]  # noqa: E731
        assert names() == ["c-file", "a-file", "b-file"]  # newest first
        assert names(sort="name", direction="asc") == ["a-file", "b-file", "c-file"]
        assert names(sort="file_size", direction="desc") == ["b-file", "c-file", "a-file"]
        assert names(search="a-f") == ["a-file"] and names(search="%") == []
        page = c.get("/files", params={"per_page": 2, "page": 2}).json()["data"]
        assert len(page["items"]) == 1 and page["pagination"] == {"current_page": 2, "per_page": 2, "total": 3,
                                                                  "last_page": 2}
        assert c.get("/files", params={"sort": "id; DROP TABLE files"}).status_code == 422
        assert c.get("/files", params={"type": "bogus"}).status_code == 422
        # a client-supplied filename never becomes a path
        r = c.post("/files", files={"file": ("../../etc/evil.py", b"print(1)")}, data={"type": "reward_function"})
        assert r.status_code == 201
        f = r.json()["data"]
        assert f["original_filename"] == "evil.py" and not (live.settings.data_dir / "etc").exists()
        stored = list(live.settings.files_dir.iterdir())
        assert all(p.name.count("-") == 4 for p in stored)  # uuid names only
        r = c.get(f"/files/{f['id']}/download")
        assert r.content == b"print(1)" and 'filename="evil.py"' in r.headers["content-disposition"]
        # PUT: rename and replace code; prompt content cannot be replaced
        r = c.put(f"/files/{f['id']}", json={"name": "renamed", "content": "def reward_fn(c, **k):\n    return 1.0\n"})
        assert r.status_code == 200 and r.json()["data"]["name"] == "renamed"
        assert c.get(f"/files/{f['id']}/content").json()["data"]["content"].startswith("def reward_fn")
        p = c.post("/files", files={"file": ("p.jsonl", PROMPTS.encode())}, data={"type": "prompt"}).json()["data"]
        assert c.put(f"/files/{p['id']}", json={"content": "x"}).status_code == 422
        # missing fields / bad types
        assert c.post("/files", files={"file": ("p.jsonl", b"x")}, data={"type": "video"}).status_code == 422
        assert c.post("/files", data={"type": "prompt"}, files={"other": ("a", b"x")}).status_code == 422
        assert c.post("/files", json={"type": "prompt", "name": "n"}).json()["details"] == {"content": "is required"}
        # binary content
        b = c.post("/files", files={"file": ("bin.jsonl", b"\xff\xfe\x00")}, data={"type": "sft"}).json()["data"]
        assert c.get(f"/files/{b['id']}/content").status_code == 422
        # force delete purges bytes
        assert c.delete(f"/files/{b['id']}", params={"force": "true"}).json()["data"]["purged"] is True
        assert not (live.settings.files_dir / b["id"]).exists()
    other = live.key("mallory")
    with live.client(other) as c:
        for method, suffix in (("GET", ""), ("GET", "/content"), ("GET", "/preview"), ("GET", "/download"),
                               ("PUT", ""), ("DELETE", "")):
            r = c.request(method, f"/files/{f['id']}{suffix}", json={"name": "x"} if method == "PUT" else None)
            assert r.status_code == 404, (method, suffix)
        assert c.get("/files").json()["data"]["items"] == []


def test_upload_cap(make_live, settings):
    live = make_live(replace(settings, max_upload_bytes=1000))
    with live.client(live.key()) as c:
        r = c.post("/files", files={"file": ("big.jsonl", b"x" * 1001)}, data={"type": "prompt"})
        assert r.status_code == 422 and "too large" in r.json()["message"] and "1000" not in r.json()["message"]
        r = c.post("/files", json={"type": "reward_function", "name": "n", "content": "y" * 1001})
        assert r.status_code == 422
        assert c.post("/files", files={"file": ("ok.jsonl", b"x" * 1000)}, data={"type": "prompt"}).status_code == 201
    assert [p.stat().st_size for p in live.settings.files_dir.iterdir()] == [1000]


def test_upload_cap_default_is_50mb(live):
    with live.client(live.key()) as c:
        r = c.post("/files", files={"file": ("big.jsonl", b"x" * (50 * 1024 * 1024 + 1))}, data={"type": "prompt"})
    assert r.status_code == 422 and "50 MB" in r.json()["message"]
    assert list(live.settings.files_dir.iterdir()) == []


def test_validation_both_paths(live, tmp_path):
    sdk = runrl.RunRLClient(api_key=live.key(), base_url=live.url)
    (tmp_path / "p.jsonl").write_text(PROMPTS)
    prompt = sdk.files.upload_path(str(tmp_path / "p.jsonl"), file_type="prompt")
    res = sdk.validation.prompt_file(prompt.id)
    assert res.valid and res.details["total_lines"] == 6 and res.details["extra_fields"] == ["expected"]
    res = sdk.validation.reward_function(code=REWARD, prompt_file_id=prompt.id)
    assert res.valid, res.error
    samples = res.details["samples"]
    # the dummy completion "This is a sample ..." contains "hi" (row 1) but not "yo" or "ok"
    assert [s["reward"] for s in samples] == [1.0, 0.0, 0.0]
    res = sdk.validation.reward_function(code="def nope(:\n")
    assert not res.valid and res.error
    res = sdk.validation.reward_function(code="def reward_fn(completion, **kw):\n    raise ValueError('bad')\n",
                                         prompt_file_id=prompt.id)
    assert not res.valid and "bad" in res.error
    env = ("class CustomEnv:\n    def setup(self, **kw):\n        self.n = 0\n"
           "    def step(self, action):\n        return {'observation': 'ok', 'reward': 1.0, 'done': True}\n")
    assert sdk.validation.reward_function(code=env, mode="environment").valid
    bad = sdk.files.create_from_content(name="bad", content='{"prompt": 3}\nnot json\n', file_type="sft")
    sft = sdk.files.create_from_content(name="sft", content='{"messages": [{"role": "user", "content": "a"}, '
                                        '{"role": "assistant", "content": "b"}]}\n', file_type="sft")
    assert sdk.validation.sft_file(sft.id).valid
    res = sdk.validation.sft_file(bad.id)
    assert not res.valid and res.details["invalid_lines"] == [1, 2]
    with live.client(sdk._session._client.headers["Authorization"][7:]) as c:  # the docs' paths
        r = c.post("/validation/prompt", json={"prompt_file_id": prompt.id})
        assert r.status_code == 200 and r.json()["data"]["valid"]
        r = c.post("/validation/sft", json={"sft_file_id": sft.id})
        assert r.json()["data"]["valid"]
        r = c.post("/validation/reward-function", json={"functionCode": REWARD, "mode": "function"})
        assert r.json()["data"]["valid"]
        assert c.post("/validation/prompt", json={"prompt_file_id": sft.id}).status_code == 422  # wrong type
        assert c.post("/validation/reward-function", json={"mode": "function"}).status_code == 422
        assert c.post("/validation/reward-function", json={"functionCode": "x", "mode": "odd"}).status_code == 422
    with pytest.raises(NotFoundError):
        runrl.RunRLClient(api_key=live.key("eve"), base_url=live.url).validation.prompt_file(prompt.id)
