"""`runrl serve --executor ray` against a real local Ray head (CPU only, loopback), driven by the official SDK.

One head serves the whole module (it takes 10-20 s to start); the test that kills it runs last. The server is a
real `runrl serve` subprocess with `--slots 2 --ray-cpus-per-run 2` on a 2-CPU head, so Ray fits one run at a
time and a second one waits for the first's resources. Without ray installed these tests are skipped (the
startup errors are checked either way).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.server.conftest import PROMPTS, REWARD, free_port

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
SECRET = "hf_raySECRETvalue4567"
TRAIN = {"model": "builtin:tiny", "type": "reward_function", "completion_length": 128, "max_steps": 2,
         "num_generations": 2, "prompts_per_step": 2, "epochs": 1, "learning_rate_multiplier": 1.0}
try:
    import ray.job_submission  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='ray is not installed (pip install "runrl-engine[ray]")')


def serve_argv(data: Path, port: int, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--executor", "ray", "--ray-address", address,
            "--data-dir", str(data), "--port", str(port), "--gpus", "none", *extra]


def test_executor_ray_without_ray_exits_2_with_the_install_hint(tmp_path):
    blocked = ("import sys; sys.modules['ray'] = None; sys.argv[0] = 'runrl'; from server.cli import main; "
               "sys.exit(main())")
    argv = serve_argv(tmp_path / "d", free_port(), "http://127.0.0.1:1")[3:]
    out = subprocess.run([sys.executable, "-c", blocked, *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert 'pip install "runrl-engine[ray]"' in out.stderr and "--executor ray" in out.stderr


@needs_ray
def test_unreachable_job_server_exits_2_naming_ray_address(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = subprocess.run(serve_argv(tmp_path / "d", free_port(), address), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"--ray-address {address}" in out.stderr and "cannot reach the Ray job server" in out.stderr


@pytest.mark.parametrize("code", [0, 2, 1, -9])
def test_ray_entry_runs_the_plan_and_records_the_exit_status(tmp_path, code):
    """The job's entrypoint (no Ray needed): the 0600 plan is gone before training, the secrets arrive on stdin,
    stdout/stderr land in the run's logs, and the status is recorded as the trainer's own (2 stays 2)."""
    child = ("import json, os, sys; plan_gone = not os.path.exists('ray_launch.json'); "
             "print(json.dumps({'stdin': json.loads(sys.stdin.read()), 'gone': plan_gone, 'x': os.environ['X']})); "
             "print('error: a user error' if int(sys.argv[1]) == 2 else 'a traceback', file=sys.stderr); "
             "sys.stdout.flush(); c = int(sys.argv[1]); os.kill(os.getpid(), -c) if c < 0 else sys.exit(c)")
    plan = {"argv": [sys.executable, "-c", child, str(code)], "env": {"X": "y"},
            "stdin": json.dumps({"hf_token": SECRET})}
    (tmp_path / "ray_launch.json").write_text(json.dumps(plan))
    out = subprocess.run([sys.executable, str(REPO / "server" / "ray_entry.py"), str(tmp_path)], timeout=60)
    assert out.returncode == (code if code >= 0 else 128 - code)
    assert json.loads((tmp_path / "ray_exit.json").read_text()) == {"code": code}
    seen = json.loads((tmp_path / "process.log").read_text())
    assert seen == {"stdin": {"hf_token": SECRET}, "gone": True, "x": "y"}
    assert ("error: a user error" if code == 2 else "a traceback") in (tmp_path / "stderr.log").read_text()
    assert not (tmp_path / "ray_launch.json").exists()


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    """A local Ray head (2 CPUs, no GPU) for the module; its job server's address."""
    if not HAVE_RAY:
        pytest.skip('ray is not installed (pip install "runrl-engine[ray]")')
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
    dash = free_port()
    start = [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2", "--num-gpus", "0",
             "--temp-dir", temp, "--disable-usage-stats"]
    out = subprocess.run(start, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def start_serve(state: dict[str, Any]) -> None:
    """A `runrl serve --executor ray` subprocess on `state`'s data dir, once it answers; its SDK client."""
    import runrl

    port = free_port()
    proc = subprocess.Popen(serve_argv(state["data"], port, state["head"], "--slots", "2", "--ray-cpus-per-run",
                                       "2", "--ray-grace-s", "5"), cwd=REPO)
    url = f"http://127.0.0.1:{port}/api/v1"
    deadline = time.time() + 240  # the startup probe is a Ray job too
    while True:
        assert proc.poll() is None, "runrl serve --executor ray exited"
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.HTTPError:
            assert time.time() < deadline, "runrl serve --executor ray did not start"
            time.sleep(0.3)
    state.update(proc=proc, url=url, sdk=runrl.RunRLClient(api_key=state["token"], base_url=url, poll_interval=0.5))


@pytest.fixture(scope="module")
def live(head, tmp_path_factory) -> Iterator[dict[str, Any]]:
    from server.cli import create_key

    data = tmp_path_factory.mktemp("ray") / "data"
    token = create_key(name="k", scopes=["read", "write"], user="alice", data_dir=data)
    state: dict[str, Any] = {"data": data, "head": head, "token": token}
    start_serve(state)
    sdk = state["sdk"]
    path = data.parent / "prompts.jsonl"
    path.write_text(PROMPTS)
    prompt = sdk.files.upload_path(str(path), file_type="prompt", name="Say words")
    reward = sdk.files.create_from_content(name="contains", content=REWARD, file_type="reward_function",
                                           original_filename="reward.py")
    from ray.job_submission import JobSubmissionClient

    state.update(prompt=prompt, reward=reward, jobs=JobSubmissionClient(head))
    yield state
    state["proc"].send_signal(signal.SIGINT)
    try:
        state["proc"].wait(timeout=60)
    except subprocess.TimeoutExpired:
        state["proc"].kill()


def create(live: dict[str, Any], **extra: Any) -> Any:
    return live["sdk"].runs.create(prompt_file_id=live["prompt"].id, reward_file_id=live["reward"].id,
                                   **{**TRAIN, **extra})


def job_id(live: dict[str, Any], run_id: int, attempt: int = 1) -> str:
    tag = (live["data"] / "ray_tag").read_text().strip()
    return f"runrl-{tag}-run{run_id}-attempt{attempt}"


def wait(live: dict[str, Any], run_id: int, statuses: set[str], timeout: float) -> Any:
    deadline = time.time() + timeout
    while (run := live["sdk"].runs.get(run_id)).status not in statuses:
        assert time.time() < deadline, f"run {run_id} stayed {run.status}"
        time.sleep(0.3)
    return run


@pytest.mark.slow
def test_run_completes_streams_logs_records_metrics_and_deploys(live):
    from runrl.exceptions import RunFailedError

    sdk = live["sdk"]
    future = create(live, hf_token=SECRET)
    try:
        run = future.result(timeout=600)
    except RunFailedError as exc:
        pytest.fail(f"run failed: {exc.run.error_message}")
    assert run.status == "COMPLETED" and run.progress == 1.0 and run.error_message is None
    assert [h["status"] for h in sdk.runs.history(run.id)] == ["PENDING", "SETTING_UP", "RUNNING", "COMPLETED"]
    text = "\n".join(sdk.runs.logs(run.id, last_line=0, limit=1000)["lines"])
    assert "step 2" in text and SECRET not in text
    assert [h["step"] for h in sdk.runs.metrics(run.id)["history"]] == [1, 2]
    streamed = list(sdk.runs.stream_logs(run.id))
    assert streamed[-2:] == ["event: end", 'data: {"status": "COMPLETED"}']
    # the Ray job ran it, and nothing Ray's job API shows holds the secret
    info = live["jobs"].get_job_info(job_id(live, run.id))
    assert str(info.status.value) == "SUCCEEDED" and info.entrypoint.endswith(f"/runs/{run.id}")
    assert info.metadata["runrl_run_id"] == str(run.id)
    assert SECRET not in json.dumps({"entrypoint": info.entrypoint, "metadata": info.metadata,
                                     "runtime_env": info.runtime_env, "message": info.message}, default=str)
    assert SECRET not in live["jobs"].get_job_logs(job_id(live, run.id))
    run_dir = live["data"] / "runs" / str(run.id)
    assert not (run_dir / "ray_launch.json").exists() and not (run_dir / "ray_exit.json").exists()
    for f in run_dir.rglob("*"):
        if f.is_file() and f.suffix in (".txt", ".log", ".jsonl", ".yaml", ".json"):
            assert SECRET not in f.read_text(errors="replace"), f
    # the finished model deploys (the deployment itself runs on the server)
    dep = sdk.deployments.create(run.id, poll_interval=0.5).result(timeout=300)
    assert dep.status == "active"
    with httpx.Client(headers={"Authorization": f"Bearer {live['token']}"}, timeout=120) as c:
        r = c.post(f"{dep.api_url}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
    sdk.deployments.delete(dep.id)


@pytest.mark.slow
def test_second_run_waits_for_ray_resources_then_starts(live):
    first, second = create(live), create(live)
    # both are submitted (two slots); Ray fits one (2 CPUs each on a 2-CPU head) and does not promise which
    # pending job it starts first, so `a` is whichever runs first and `b` the other
    ids = {first.initial.id, second.initial.id}
    deadline = time.time() + 300
    while not (running := [i for i in ids if live["sdk"].runs.get(i).status == "RUNNING"]):
        assert time.time() < deadline, "neither run started"
        time.sleep(0.3)
    a = running[0]
    (b,) = ids - {a}
    time.sleep(2)
    assert live["sdk"].runs.get(b).status == "SETTING_UP"
    assert str(live["jobs"].get_job_status(job_id(live, b)).value) == "PENDING"
    assert wait(live, a, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600).status == "COMPLETED"
    assert wait(live, b, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600).status == "COMPLETED"
    ended = [h["timestamp"] for h in live["sdk"].runs.history(a) if h["status"] == "COMPLETED"][0]
    began = [h["timestamp"] for h in live["sdk"].runs.history(b) if h["status"] == "RUNNING"][0]
    assert began >= ended


@pytest.mark.slow
def test_cancel_stops_the_ray_job(live):
    future = create(live, max_steps=200)
    run_id = future.initial.id
    wait(live, run_id, {"RUNNING"}, timeout=300)
    with httpx.Client(base_url=live["url"], headers={"Authorization": f"Bearer {live['token']}"}) as c:
        assert c.post(f"/runs/{run_id}/cancel").status_code == 200
    run = wait(live, run_id, {"CANCELLED", "FAILED", "COMPLETED"}, timeout=120)
    assert run.status == "CANCELLED"
    assert str(live["jobs"].get_job_status(job_id(live, run_id)).value) == "STOPPED"


@pytest.mark.slow
def test_restarted_server_stops_the_old_job_and_resumes_the_run(live):
    """kill -9 of the server mid-run: the Ray job goes on without it; the next server's recover() stops that job
    (attempt 1) and requeues the run, whose attempt 2 (a new job, --resume) completes."""
    future = create(live, max_steps=4)
    run_id = future.initial.id
    wait(live, run_id, {"RUNNING"}, timeout=300)
    live["proc"].kill()
    live["proc"].wait(timeout=30)
    assert str(live["jobs"].get_job_status(job_id(live, run_id)).value) == "RUNNING"  # orphaned on the cluster
    start_serve(live)
    assert str(live["jobs"].get_job_status(job_id(live, run_id)).value) == "STOPPED"
    run = wait(live, run_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    assert run.status == "COMPLETED", run.error_message
    history = live["sdk"].runs.history(run_id)
    assert any(h["status"] == "PENDING" and h["message"].startswith("The server restarted while this run was in "
                                                                    "progress; its training process was stopped")
               for h in history), history
    assert str(live["jobs"].get_job_status(job_id(live, run_id, attempt=2)).value) == "SUCCEEDED"


@pytest.mark.slow
def test_head_killed_mid_run_never_leaves_it_running(live):
    """Last in the module: it stops the module's head."""
    future = create(live, max_steps=500)
    run_id = future.initial.id
    wait(live, run_id, {"RUNNING"}, timeout=300)
    run_dir = live["data"] / "runs" / str(run_id)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists():  # the trainer is really training
        assert time.time() < deadline
        time.sleep(0.5)
    subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
    run = wait(live, run_id, {"PENDING", "FAILED"}, timeout=120)  # ray_grace_s is 5 s
    history = live["sdk"].runs.history(run_id)
    assert "did not answer" in history[-1]["message"] or "no longer knows" in history[-1]["message"], history[-1]
    if run.status == "FAILED":
        assert run.error_message
    time.sleep(5)
    assert live["sdk"].runs.get(run_id).status in ("PENDING", "FAILED")  # the queue waits for the cluster
    # the head's death took the training processes with it (Ray's watcher kills the job's process group)
    deadline = time.time() + 30
    while survivors := [p for p in Path("/proc").iterdir() if p.name.isdigit() and _runs_in(p, run_dir)]:
        assert time.time() < deadline, survivors
        time.sleep(0.5)


def _runs_in(proc: Path, run_dir: Path) -> bool:
    try:
        return str(run_dir) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return False

