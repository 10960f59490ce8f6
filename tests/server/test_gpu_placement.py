"""GPU placement (server/gpus.py, RunQueue.claim) and RunRL's legacy create keys (server/legacy.py), on a real
server. The GPUs are `Settings.gpus` ids on this CPU machine (`runrl serve --gpus 0,1` sets them the same way): what
is checked is what the server does with them, the CUDA_VISIBLE_DEVICES each training process sees (written to its
log by a stand-in trainer, read back through the API) and the queue's rule; no CUDA device is touched. Two slow
tests run the real `runrl launch --multi_gpu --num_processes 2` of the tiny quickstart (gloo on CPU): through the
server to COMPLETED, and killed at its launcher, leaving no process. The last checks what `runrl train` says of an
n_gpus it does not start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml

from server.cli import create_key, serve_settings
from server.gpus import detect_gpus, launch_options, parse_gpus
from server.settings import Settings
from tests.engine.test_cli import QS, write_config
from tests.server.conftest import PROMPTS, REWARD, free_port, wait_status

REPO = Path(__file__).resolve().parents[2]
REAL_TRAIN = Settings.__dataclass_fields__["train_command"].default  # runrl train

# A stand-in for `runrl train` and for `runrl launch ... train` (the worker's command for n_gpus > 1): it logs the
# CUDA_VISIBLE_DEVICES it was given, its arguments and a few config keys, then trains until the test releases it
# (a file `release` in the run directory) and exits with the code its run_name asks for.
STAND_IN = r"""
import json, os, sys, time, yaml, pathlib
args = sys.argv[1:]
config = args[args.index('train') + 1] if 'train' in args else args[0]
cfg = yaml.safe_load(open(config)); out = pathlib.Path(args[args.index('--output') + 1])
if '--secrets-stdin' in args:
    sys.stdin.read()
opts = dict(kv.split('=') for kv in (cfg.get('run_name') or 'code=0').split(','))
with open(out / 'logs.txt', 'a') as log:
    log.write('CUDA_VISIBLE_DEVICES=' + str(os.environ.get('CUDA_VISIBLE_DEVICES')) + '\n')
    log.write('argv=' + json.dumps(args) + '\n')
    log.write('config=' + json.dumps({k: cfg.get(k) for k in ('beta', 'max_prompt_length', 'max_episode_tokens',
                                                               'n_gpus')}) + '\n')
    log.flush()
    deadline = time.time() + 60
    while opts.get('hold') == '1' and not (out / 'release').exists() and time.time() < deadline:
        time.sleep(0.05)
    log.write('step 1\n')
sys.exit(int(opts['code']))
"""
STAND_IN_COMMAND = (sys.executable, "-c", STAND_IN)


@pytest.fixture
def gpu_settings(settings):
    """Two GPUs, three slots: whatever holds a run back below is its GPUs, not a slot."""
    return replace(settings, gpus=("0", "1"), slots=3, train_command=STAND_IN_COMMAND, launch_command=STAND_IN_COMMAND)


def upload(c: httpx.Client) -> tuple[str, str]:
    p = c.post("/files", files={"file": ("p.jsonl", PROMPTS.encode())}, data={"type": "prompt"}).json()["data"]
    r = c.post("/files", json={"type": "reward_function", "name": "r", "content": REWARD}).json()["data"]
    return p["id"], r["id"]


def create(c: httpx.Client, files: tuple[str, str], *, hold: bool = True, code: int = 0, **extra) -> dict:
    body = {"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": files[0],
            "reward_file_id": files[1], "completion_length": 128, "max_steps": 1,
            "run_name": f"hold={int(hold)},code={code}", **extra}
    r = c.post("/runs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["data"]


def logs(c: httpx.Client, run_id: int) -> list[str]:
    return c.get(f"/runs/{run_id}/logs", params={"limit": 1000}).json()["data"]["lines"]


def visible(c: httpx.Client, run_id: int, timeout: float = 30) -> str:
    """The CUDA_VISIBLE_DEVICES the run's training process saw (from its log, through the API)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in logs(c, run_id):
            if line.startswith("CUDA_VISIBLE_DEVICES="):
                return line.split("=", 1)[1]
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} logged no CUDA_VISIBLE_DEVICES")


def release(live, run_id: int) -> None:
    (live.settings.runs_dir / str(run_id) / "release").touch()


def stays_pending(c: httpx.Client, run_id: int, seconds: float = 1.5) -> None:
    """The run is still PENDING after `seconds` of the worker polling every 0.1 s."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert c.get(f"/runs/{run_id}").json()["data"]["status"] == "PENDING"
        time.sleep(0.1)


def test_two_runs_get_different_gpus_and_a_third_waits_for_one(make_live, gpu_settings):
    live = make_live(gpu_settings)
    with live.client(live.key()) as c:
        files = upload(c)
        a, b, third = (create(c, files) for _ in range(3))
        assert {visible(c, a["id"]), visible(c, b["id"])} == {"0", "1"}
        for run in (a, b):
            got = wait_status(c, run["id"], {"RUNNING"})
            assert got["devices"] == [visible(c, run["id"])]
        listed = {r["id"]: r["devices"] for r in c.get("/runs").json()["data"]["items"]}
        assert listed[third["id"]] is None and {tuple(listed[a["id"]]), tuple(listed[b["id"]])} == {("0",), ("1",)}
        stays_pending(c, third["id"])  # a free slot, but no free GPU
        first_gpu = visible(c, a["id"])
        release(live, a["id"])
        assert wait_status(c, a["id"], {"COMPLETED"})["devices"] == [first_gpu]  # kept as a record
        assert visible(c, third["id"]) == first_gpu  # the GPU a released
        history = [h["message"] for h in c.get(f"/runs/{third['id']}/history").json()["data"]["history"]]
        assert f"Claimed by a worker on GPU(s) {first_gpu}; preparing the run directory" in history
        for run in (b, third):
            release(live, run["id"])
            wait_status(c, run["id"], {"COMPLETED"})


def test_a_two_gpu_run_waits_for_both_and_blocks_younger_runs(make_live, gpu_settings):
    """First come, first served: the 2-GPU run waits for GPU 0 while GPU 1 is free, and the 1-GPU run created
    after it does not take GPU 1 meanwhile (so small runs cannot starve it)."""
    live = make_live(gpu_settings)
    with live.client(live.key()) as c:
        files = upload(c)
        small = create(c, files)
        assert visible(c, small["id"]) == "0"
        big = create(c, files, n_gpus=2, prompts_per_step=2)
        assert big["parameters"]["n_gpus"] == 2 and big["devices"] is None
        younger = create(c, files)
        stays_pending(c, big["id"])
        assert c.get(f"/runs/{younger['id']}").json()["data"]["status"] == "PENDING"  # GPU 1 free, but behind big
        release(live, small["id"])
        assert visible(c, big["id"]) == "0,1"
        running = wait_status(c, big["id"], {"RUNNING"})
        assert running["devices"] == ["0", "1"]
        stays_pending(c, younger["id"], 0.5)  # both GPUs are big's now
        # the worker's command for n_gpus 2: runrl launch with accelerate's options, then the trainer's
        argv = json.loads(next(x for x in logs(c, big["id"]) if x.startswith("argv="))[5:])
        cut = argv.index("train")
        assert argv[:cut - 2] == ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                                  "no", "--dynamo_backend", "no"]
        assert argv[cut - 2] == "--main_process_port" and 1024 <= int(argv[cut - 1]) <= 65535
        run_dir = live.settings.runs_dir / str(big["id"])
        assert argv[cut + 1:] == [str(run_dir / "run.yaml"), "--output", str(run_dir), "--secrets-stdin"]
        small_argv = json.loads(next(x for x in logs(c, small["id"]) if x.startswith("argv="))[5:])
        assert "train" not in small_argv and "--multi_gpu" not in small_argv  # one process: plain runrl train
        release(live, big["id"])
        assert visible(c, younger["id"]) == "0"
        release(live, younger["id"])
        for run in (big, younger):
            assert wait_status(c, run["id"], {"COMPLETED", "FAILED"})["status"] == "COMPLETED"


def test_gpus_are_released_after_cancel_and_failure(make_live, gpu_settings):
    live = make_live(replace(gpu_settings, gpus=("7",)))
    with live.client(live.key()) as c:
        files = upload(c)
        cancelled, failed, last = create(c, files), create(c, files, hold=False, code=1), create(c, files)
        assert visible(c, cancelled["id"]) == "7"
        stays_pending(c, failed["id"], 0.5)
        c.post(f"/runs/{cancelled['id']}/cancel")
        assert wait_status(c, cancelled["id"], {"CANCELLED", "FAILED", "COMPLETED"})["status"] == "CANCELLED"
        assert visible(c, failed["id"]) == "7"
        assert wait_status(c, failed["id"], {"CANCELLED", "FAILED", "COMPLETED"})["status"] == "FAILED"
        assert visible(c, last["id"]) == "7"
        release(live, last["id"])
        assert wait_status(c, last["id"], {"COMPLETED"})["devices"] == ["7"]


def test_n_gpus_is_checked_at_create(make_live, gpu_settings, settings):
    def refused(c, body_extra, key="n_gpus"):
        r = c.post("/runs", json={"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": files[0],
                                  "reward_file_id": files[1], **body_extra})
        assert r.status_code == 422, r.text
        assert key in r.json()["details"], r.json()
        return r.json()

    live = make_live(gpu_settings)
    with live.client(live.key()) as c:
        files = upload(c)
        err = refused(c, {"n_gpus": 3})
        assert err["details"]["n_gpus"] == "asks for 3 GPUs, but this server has 2 GPU(s) (0,1); ask for at most 2"
        assert err["message"].startswith("Validation failed: n_gpus: asks for 3 GPUs")
        refused(c, {"n_gpus": 0})
        refused(c, {"n_gpus": "two"})
        refused(c, {"n_gpus": True})
        assert "multiple of 2" in refused(c, {"n_gpus": 2, "prompts_per_step": 3})["details"]["n_gpus"]
        assert c.get("/runs").json()["data"]["pagination"]["total"] == 0
    for placement in (None, ()):  # no placement (a Settings built by hand), CPU only (`--gpus none`)
        live = make_live(replace(settings, gpus=placement, data_dir=settings.data_dir.parent / f"d{placement}"))
        with live.client(live.key()) as c:
            files = upload(c)
            assert "n_gpus must be 1 here" in refused(c, {"n_gpus": 2})["details"]["n_gpus"]


def test_cpu_only_server_gives_runs_no_gpu(make_live, gpu_settings):
    """`--gpus none`: runs are told there is no GPU (CUDA_VISIBLE_DEVICES empty), slots alone bound them."""
    live = make_live(replace(gpu_settings, gpus=(), slots=2))
    with live.client(live.key()) as c:
        files = upload(c)
        runs = [create(c, files) for _ in range(2)]
        for run in runs:
            assert visible(c, run["id"]) == ""
            assert wait_status(c, run["id"], {"RUNNING"})["devices"] is None
            release(live, run["id"])
            wait_status(c, run["id"], {"COMPLETED"})


def test_legacy_keys_are_mapped_or_ignored_with_a_warning(make_live, gpu_settings):
    live = make_live(gpu_settings)
    svc = live.app.state.services
    with live.client(live.key()) as c:
        files = upload(c)
        run = create(c, files, hold=False, kl_beta=0.05, max_seq_length=600, gpu_type="H100", turbo=True, n_gpus=1)
        stored = svc.store.run(run["id"])["config"]
        assert stored["beta"] == 0.05 and stored["max_prompt_length"] == 600 - 128
        assert stored["max_episode_tokens"] == 600 and stored["n_gpus"] == 1
        assert "kl_beta" not in stored and "gpu_type" not in stored and "turbo" not in stored
        params = run["parameters"]
        assert params["kl_beta"] == 0.05 and params["beta"] == 0.05 and params["max_seq_length"] == 600
        assert params["max_prompt_length"] == 472 and params["gpu_type"] == "H100" and params["turbo"] is True
        done = wait_status(c, run["id"], {"COMPLETED", "FAILED"})
        assert done["status"] == "COMPLETED", done
        lines = logs(c, run["id"])
        trained = json.loads(next(x for x in lines if x.startswith("config="))[7:])  # what the trainer was given
        assert trained == {"beta": 0.05, "max_prompt_length": 472, "max_episode_tokens": 600, "n_gpus": 1}
        gpu_warning = "gpu_type 'H100' is ignored: this server has 2 GPU(s) (0,1), and n_gpus says how many of them " \
                      "a run gets"
        turbo_warning = "turbo is ignored: it is RunRL's hosted 8xH100 mode, which this server does not have"
        assert f"[server] warning: {gpu_warning}" in lines and f"[server] warning: {turbo_warning}" in lines
        history = c.get(f"/runs/{run['id']}/history").json()["data"]["history"]
        assert history[0]["message"] == f"Run queued; warning: {gpu_warning}; warning: {turbo_warning}"
        # turbo false and no gpu_type: nothing ignored, nothing said
        quiet = create(c, files, hold=False, turbo=False, kl_beta=0)
        assert wait_status(c, quiet["id"], {"COMPLETED"})["parameters"]["beta"] == 0
        assert not any("warning" in line for line in logs(c, quiet["id"]))
        assert c.get(f"/runs/{quiet['id']}/history").json()["data"]["history"][0]["message"] == "Run queued"

        def refused(key, **extra):
            r = c.post("/runs", json={"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": files[0],
                                      "reward_file_id": files[1], **extra})
            assert r.status_code == 422 and key in r.json()["details"], r.text
            return r.json()["details"][key]

        assert refused("kl_beta", kl_beta="high") == "must be a number between 0 and 100 (it sets beta, the KL coefficient)"
        refused("kl_beta", kl_beta=-1)
        refused("kl_beta", kl_beta=True)
        assert "give one of them" in refused("kl_beta", kl_beta=0.1, beta=0.2)
        assert refused("max_seq_length", max_seq_length=100, completion_length=128).startswith(
            "must be an integer between 129 and")
        refused("max_seq_length", max_seq_length="long")
        refused("max_seq_length", max_seq_length=512.5)
        assert "max_prompt_length is given too" in refused("max_seq_length", max_seq_length=2048, max_prompt_length=9)
        refused("gpu_type", gpu_type=8)
        refused("turbo", turbo="yes")
        create(c, files, hold=False, kl_beta=0.1, beta=0.1)  # the same value twice is no conflict


def test_runrl_serve_gpus_flag(tmp_path):
    """`--gpus` reaches the server (a run asking for more is refused naming them); a bad value is a one-line
    error naming --gpus, exit 2, before anything starts; unset, the operator's CUDA_VISIBLE_DEVICES is used."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path / "data")]
    for bad, why in (("0,,1", "an empty GPU id"), ("0,1,0", "GPU 0 is listed twice"), ("gpu zero", "not a GPU id")):
        proc = subprocess.run([*cli, "--gpus", bad], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: --gpus {bad}: ") and why in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "data").exists()
    assert parse_gpus("0, 1,GPU-8f3a2c1e-1b2d-4c3e-9f00-0123456789ab") == ("0", "1",
                                                                           "GPU-8f3a2c1e-1b2d-4c3e-9f00-0123456789ab")
    assert parse_gpus("none") == parse_gpus("") == ()
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ("3", "5")
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == detect_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == ()
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ("2",)  # CUDA stops at an invalid entry too
    os.environ["CUDA_VISIBLE_DEVICES"] = "4,6,7"
    try:
        detected = serve_settings(data_dir=tmp_path / "x")
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    assert detected.gpus == ("4", "6", "7") and detected.slots == 3
    assert serve_settings(data_dir=tmp_path / "x", gpus=(), slots=None).slots == 1

    port = free_port()
    server = subprocess.Popen([*cli, "--gpus", "0,1", "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and server.poll() is None, "runrl serve did not start"
            time.sleep(0.2)
        token = create_key(name="t", scopes=["read", "write"], data_dir=tmp_path / "data")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            files = upload(c)
            r = c.post("/runs", json={"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": files[0],
                                      "reward_file_id": files[1], "n_gpus": 3})
            assert r.status_code == 422 and "this server has 2 GPU(s) (0,1)" in r.json()["details"]["n_gpus"]
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert "runrl serve: this server has 2 GPU(s) (0,1); up to 2 run(s) at once" in out


# ---- the real launcher ----------------------------------------------------------------------------------------

def _processes_in(run_dir: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(run_dir) in cmdline and state not in ("Z", "X"):
                found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.mark.slow
def test_two_gpu_run_under_the_real_launcher(make_live, settings, tiny_model_dir):
    """n_gpus 2 through the server runs the real `runrl launch --multi_gpu --num_processes 2 ... train` (two
    processes over gloo on this CPU, each told CUDA_VISIBLE_DEVICES=0,1) to COMPLETED, with the secrets read once by
    the launcher and given to each process (rank 0, which writes config.yaml, has hf_token: it shows redacted)."""
    live = make_live(replace(settings, gpus=("0", "1"), slots=1, train_command=REAL_TRAIN,
                             extra_env={"OMP_NUM_THREADS": "1"}))
    with live.client(live.key()) as c:
        p = c.post("/files", files={"file": ("p.jsonl", (QS / "prompts.jsonl").read_bytes())},
                   data={"type": "prompt"}).json()["data"]["id"]
        r = c.post("/files", json={"type": "reward_function", "name": "r",
                                   "content": (QS / "reward.py").read_text()}).json()["data"]["id"]
        run = c.post("/runs", json={"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": p,
                                    "reward_file_id": r, "completion_length": 8, "num_generations": 2,
                                    "prompts_per_step": 2, "eval_every": 0, "max_steps": 2, "n_gpus": 2,
                                    "hf_token": "hf_NOTAREALTOKENNOTAREALTOKEN00"}).json()["data"]
        done = wait_status(c, run["id"], {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
        run_dir = live.settings.runs_dir / str(run["id"])
        assert done["status"] == "COMPLETED", (done, (run_dir / "stderr.log").read_text()[-3000:])
        assert done["devices"] == ["0", "1"]
        text = "\n".join(logs(c, run["id"]))
        assert "on 2 process(es)" in text and "warning: n_gpus" not in text
        assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["hf_token"] == "***"


@pytest.mark.slow
def test_launched_processes_die_with_the_launcher(tmp_path, tiny_model_dir):
    """torch starts each process of `runrl launch` in a session of its own, so the SIGKILL that `runrl serve` sends
    a run's process group (after a cancel's grace period, or to what a crashed server left behind) reaches only
    the launcher; its processes must not go on training, holding GPUs that the queue has freed."""
    config = write_config(tmp_path, max_steps=500, prompts_per_step=2)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "runrl_engine.cli", "launch", *launch_options(2, free_port()),
                                 "train", str(config), "--output", str(out)], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (out / "logs.txt").exists() or "process(es)" not in (out / "logs.txt").read_text():
            assert time.time() < deadline and launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        assert len(_processes_in(out)) == 3  # the launcher and its two processes, training
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.time() + 10
        while _processes_in(out) and time.time() < deadline:
            time.sleep(0.1)
        assert not _processes_in(out)
    finally:
        for line in _processes_in(out):  # never leave one behind, whatever failed above
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_runrl_train_warns_when_n_gpus_is_not_its_process_count(tmp_path, tiny_model_dir):
    """`runrl train` starts one process whatever n_gpus says (runrl serve and runrl launch start N): it trains, and
    says so in logs.txt; unset or equal to the process count, nothing is said."""
    from runrl_engine import train
    from tests.engine.test_trainer import cfg

    train(cfg(max_steps=1, n_gpus=2), output_dir=tmp_path / "two")
    log = (tmp_path / "two" / "logs.txt").read_text()
    assert ("warning: n_gpus is 2, but this run has 1 process(es): runrl train starts one; runrl launch --multi_gpu "
            "--num_processes 2 train ... starts 2 (runrl serve does that itself)") in log
    train(cfg(max_steps=1, n_gpus=1), output_dir=tmp_path / "one")
    assert "n_gpus" not in (tmp_path / "one" / "logs.txt").read_text()
