"""`GET /runs/{id}/model` (server/routes/run_model.py) against a real server: the streamed .tar.gz holds final/'s
regular files byte for byte, never follows a symbolic link out of it, and is refused for another user's run (404)
or a run without a final model (409, with the reason)."""

from __future__ import annotations

import io
import os
import tarfile

from tests.server.conftest import PROMPTS, REWARD, completed_run, wait_status


def _completed(live, user: str = "alice") -> int:
    store = live.app.state.services.store
    run_id = completed_run(store, user)
    final = live.settings.runs_dir / str(run_id) / "final"
    (final / "sub").mkdir(parents=True)
    (final / "config.json").write_text('{"model_type": "llama"}')
    (final / "sub" / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several chunks, unaligned
    secret = live.settings.data_dir / "outside.txt"
    secret.write_text("not part of the model")
    (final / "link.txt").symlink_to(secret)
    return run_id


def test_download_streams_final_files_and_refuses_others(live):
    run_id = _completed(live)
    final = live.settings.runs_dir / str(run_id) / "final"
    with live.client(live.key("alice", scopes="read")) as c:
        r = c.get(f"/runs/{run_id}/model")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/gzip"
        assert f'filename="run-{run_id}-model.tar.gz"' in r.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
            assert sorted(tar.getnames()) == ["final/config.json", "final/sub/weights.bin"]  # no link.txt
            for name in tar.getnames():
                assert tar.extractfile(name).read() == (final / name.removeprefix("final/")).read_bytes()
    with live.client(live.key("alice")) as c:  # a run that failed has no model
        files = [c.post("/files", json={"name": n, "type": t, "content": body}).json()["data"]["id"]
                 for n, t, body in (("p.jsonl", "prompt", PROMPTS), ("r.py", "reward_function", REWARD))]
        failed = c.post("/runs", json={"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": files[0],
                                       "reward_file_id": files[1], "run_name": "sleep=0.2,code=1"}).json()["data"]["id"]
        wait_status(c, failed, {"FAILED"})
        r = c.get(f"/runs/{failed}/model")
        assert r.status_code == 404 and "FAILED" in r.json()["message"], r.text  # the owner is told why
    (final / "config.json").rename(final / "adapter_config.json")  # an adapter-only final/ (merge_lora: false)
    with live.client(live.key("alice")) as c:
        with c.stream("GET", f"/runs/{run_id}/model") as r:
            assert r.status_code == 200, r.read()
            names = tarfile.open(fileobj=io.BytesIO(r.read()), mode="r:gz").getnames()
        assert "final/adapter_config.json" in names
    (final / "adapter_config.json").unlink()
    with live.client(live.key("alice")) as c:
        r = c.get(f"/runs/{run_id}/model")
        assert r.status_code == 404 and "final/ holds neither" in r.json()["message"], r.text
    with live.client(live.key("bob")) as c:
        assert c.get(f"/runs/{run_id}/model").status_code == 404  # another user's run does not exist for bob
    with live.client(None) as c:
        assert c.get(f"/runs/{run_id}/model").status_code == 401
