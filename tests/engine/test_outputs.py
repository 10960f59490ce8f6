import json

from runrl_engine.metrics import RunOutputs


def test_logs_are_redacted_and_records_are_whole_json_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_envsecretvalue123")
    out = RunOutputs(tmp_path, enabled=True, secrets=["my-config-secret"])
    out.log("token my-config-secret and hf_envsecretvalue123 and rl_abcdefgh_0123456789abcdef0123456789abcdef")
    out.metrics({"step": 1, "loss": float("nan"), "reward_mean": 0.5})
    out.completions([{"step": 1, "completion": "héllo", "info": {"x": float("inf")}}])
    out.close()
    log = (tmp_path / "logs.txt").read_text()
    assert "my-config-secret" not in log and "hf_envsecretvalue123" not in log and "rl_abcdefgh" not in log
    assert log.count("[REDACTED]") == 3
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "reward_mean": 0.5}
    assert json.loads((tmp_path / "completions.jsonl").read_text())["info"] == {"x": None}


def test_disabled_outputs_write_nothing(tmp_path):
    out = RunOutputs(tmp_path / "rank1", enabled=False)
    out.log("x")
    out.metrics({"step": 1})
    out.close()
    assert not (tmp_path / "rank1").exists()
