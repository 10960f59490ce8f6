"""Engine-side security claims (issue 16): out-of-range rewards, isolation that fails closed, requirement
specifiers only, shared memory inside the memory cap, no secret on disk."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from runrl_engine import train
from runrl_engine.sandbox import RewardSandbox
from runrl_engine.sandbox.pool import MAX_ABS_REWARD

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "configs" / "data" / "quickstart"


def _code(tmp_path: Path, source: str, name: str = "reward.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# ---- finding 9: rewards that overflow float32 ------------------------------------------------------------

def test_overflowing_rewards_score_zero_and_the_run_completes(tmp_path, tiny_model_dir):
    reward = _code(tmp_path, """
        def reward_fn(completion, **row):
            return 1e308 if len(completion) % 2 else -3.5e38
        """)
    result = train(dict(model="builtin:tiny", prompt_file=str(QS / "prompts.jsonl"), reward_file=str(reward),
                        completion_length=8, max_steps=2, prompts_per_step=2, num_generations=4, micro_batch_size=8,
                        eval_every=0, save_every=0, max_failed_reward_steps=5), output_dir=tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward_errors"] for m in metrics] == [8, 8]
    assert all(m["reward_mean"] == 0.0 for m in metrics) and len(result.history) == 2
    completions = (tmp_path / "run" / "completions.jsonl").read_text()
    assert "rewards must lie within" in completions


def test_a_forged_out_of_range_result_is_refused_by_the_parent(tmp_path):
    # User code can find the worker's protocol descriptor and write a result line itself; the parent
    # must apply the same range check the worker does.
    reward = _code(tmp_path, """
        import os
        def reward_fn(completion, **row):
            line = b'{"op": "result", "idx": 0, "reward": 1e308, "info": {}, "error": null}\\n'
            for fd in range(3, 12):
                try:
                    os.write(fd, line)
                except OSError:
                    pass
            return 1.0
        """)
    with RewardSandbox(reward, num_workers=1, timeout_s=10) as sandbox:
        [result] = sandbox.score(["x"], [{}])
    assert result.reward == 0.0
    assert f"within ±{MAX_ABS_REWARD:g}" in (result.error or "")


# ---- finding 12: shared memory inside the memory cap -----------------------------------------------------

def _one(tmp_path: Path, source: str, **kw):
    with RewardSandbox(_code(tmp_path, source), num_workers=1, timeout_s=60, work_dir=tmp_path / "sb", **kw) as sb:
        return sb.score(["x"], [{}])[0], sb.mode


def test_dev_shm_is_a_small_private_tmpfs(tmp_path):
    result, mode = _one(tmp_path, """
        def reward_fn(completion, **row):
            written = 0
            try:
                with open("/dev/shm/fill", "wb") as f:
                    for _ in range(256):
                        f.write(b"x" * (1 << 20))
                        f.flush()
                        written += 1
            except OSError:
                pass
            return float(written)
        """, memory_mb=256)
    if mode != "bwrap":
        pytest.skip("bubblewrap unavailable: /dev/shm is the host's (documented)")
    assert result.error is None and result.reward < 65, result  # 64 MiB, not 256


def test_shared_mappings_count_against_the_memory_cap(tmp_path):
    from runrl_engine.sandbox.isolation import memory_cgroup_base

    if memory_cgroup_base() is None:
        pytest.skip("no memory cgroup can be created on this host: shared mappings are not counted (documented)")
    source = """
        import mmap
        def reward_fn(completion, **row):
            m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_SHARED)
            for i in range(0, 1 << 30, 4096):
                m[i] = 1
            return 1.0
        """
    result, _ = _one(tmp_path, source, memory_mb=256)
    assert result.reward == 0.0 and "SIGKILL" in (result.error or ""), result
    base, _ = memory_cgroup_base()
    import os

    assert not [p for p in base.glob(f"runrl-sandbox-{os.getpid()}-*")]  # released with the worker
    ok, _ = _one(tmp_path, source.replace("1 << 30", "64 << 20"), memory_mb=256)  # within the cap: fine
    assert ok.error is None and ok.reward == 1.0


# ---- the pip build's network under a destination policy ---------------------------------------------------

def test_pip_build_network_goes_through_the_egress_policy(tmp_path):
    import functools
    import http.server
    import threading

    from runrl_engine.errors import UserError
    from runrl_engine.netpolicy import DestinationPolicy
    from runrl_engine.sandbox.isolation import detect_isolation
    from runrl_engine.sandbox.requirements import install_requirements
    from tests.engine.test_user_code import _tiny_wheel

    if detect_isolation().mode != "bwrap":
        pytest.skip("a filtered network needs bubblewrap")
    index = tmp_path / "index"
    (index / "simple" / "runrl-tinypkg").mkdir(parents=True)
    wheel = _tiny_wheel(index / "simple" / "runrl-tinypkg")
    (index / "simple" / "runrl-tinypkg" / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>')
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(index)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    args = ["--index-url", f"http://127.0.0.1:{port}/simple/"]
    try:
        with pytest.raises(UserError) as refused:  # loopback is not a public address
            install_requirements(["runrl-tinypkg"], tmp_path / "env", extra_args=args, timeout_s=120,
                                 egress=DestinationPolicy())
        assert "No matching distribution" in refused.value.message and not hits  # the index saw nothing
        target = install_requirements(["runrl-tinypkg"], tmp_path / "env", extra_args=args, timeout_s=120,
                                      egress=DestinationPolicy(allowed=(f"127.0.0.1:{port}",)))
        assert (target / "runrl_tinypkg" / "__init__.py").exists() and hits
    finally:
        server.shutdown()
