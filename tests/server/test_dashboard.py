"""The web dashboard (server/dashboard) in a real headless browser: Debian's `chromium` driven by Playwright,
against a real server (conftest's `live`, whose stand-in trainer writes logs, metrics and completions).

Covered: signing in with a key; a finished run's charts with one point per step (read from the chart's data,
not the page's existence); a live run's log lines and chart points arriving while it runs; cancelling a run;
deploying a completed run and chatting with it over the streaming endpoint; downloading its model; uploading
a file with validation feedback; the other pages rendering; user strings (a file name, a run name) shown as
text, never as HTML; the Content-Security-Policy on the dashboard's responses; no script errors or CSP
violations on any page. A screenshot of every page is saved under the test's tmp dir and copied to
/tmp/dashboard-shots/. Not covered: Firefox (Playwright drives only its own Firefox build, which cannot be
downloaded here); the page uses only standard APIs (fetch streams, ES modules, ResizeObserver).

Skips when Playwright or a chromium binary is missing (.ci/run installs both where it can).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import PROMPTS, REWARD, wait_status

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and Path(p).exists()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
SHOTS = Path("/tmp/dashboard-shots")
XSS = '<img src=x onerror="window.__xss=1">'
VIEWPORT = {"width": 1366, "height": 900}  # a laptop screen


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.problems = problems  # type: ignore[attr-defined]
    yield pg
    context.close()
    # an API error the page shows on purpose is logged by the browser as a failed resource load; anything else
    # (a script error, a CSP violation) fails the test
    unexpected = [p for p in problems if "Failed to load resource" not in p]
    assert not unexpected, unexpected


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(exist_ok=True)
    shutil.copy(path, SHOTS / path.name)
    return path


def root(live) -> str:
    return live.url.removesuffix("/api/v1") + "/"


def sign_in(page, live, key: str, hash_: str = "#/runs") -> None:
    page.goto("about:blank")  # a fresh load (a hash change alone loads nothing)
    response = page.goto(root(live) + hash_)
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
    page.fill("#api-key", key)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")


def upload_task(c: httpx.Client, prompt_name: str = "prompts.jsonl") -> tuple[str, str]:
    p = c.post("/files", json={"name": prompt_name, "type": "prompt", "content": PROMPTS})
    r = c.post("/files", json={"name": "reward.py", "type": "reward_function", "content": REWARD})
    assert p.status_code == 201 and r.status_code == 201, (p.text, r.text)
    return p.json()["data"]["id"], r.json()["data"]["id"]


def start_run(c: httpx.Client, files: tuple[str, str], run_name: str) -> int:
    r = c.post("/runs", json={"model": "builtin:tiny", "type": "reward_function", "prompt_file_id": files[0],
                              "reward_file_id": files[1], "run_name": run_name})
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def chart_series(page, chart: str) -> dict:
    return json.loads(page.get_attribute(f'[data-chart="{chart}"]', "data-series"))


def test_sign_in_and_finished_run_charts_one_point_per_step(live, page, tmp_path):
    key = live.key("alice")
    with live.client(key) as c:
        run_id = start_run(c, upload_task(c), "sleep=0.2,code=0")
        wait_status(c, run_id, {"COMPLETED"})
        metrics = c.get(f"/runs/{run_id}/metrics").json()["data"]["history"]
    # a wrong key is refused with the server's message, and nothing is stored
    page.goto(root(live))
    page.fill("#api-key", "rl_wrongwro_" + "x" * 32)
    page.click("#signin button[type=submit]")
    assert "Invalid API key" in page.text_content("#signin .error")
    assert page.evaluate("sessionStorage.length") == 0
    sign_in(page, live, key)
    row = page.wait_for_selector(f'tr[data-run-id="{run_id}"]')
    assert row.get_attribute("data-status") == "COMPLETED"
    assert "builtin:tiny" in row.text_content() and "100%" in row.text_content()
    page.wait_for_function(f"""() => document.querySelector('tr[data-run-id="{run_id}"] td.num').textContent !== '—'""")
    assert row.query_selector("td.num").text_content() == "1"  # the last step's reward_mean
    shot(page, tmp_path, "runs")
    row.click()
    page.wait_for_selector('[data-chart="reward"][data-points="2"]')
    # one point per step, the values the trainer logged, in the DOM and in uPlot's own data
    assert [m["step"] for m in metrics] == [1, 2]
    assert chart_series(page, "reward") == {"x": [1, 2], "y": [m["reward_mean"] for m in metrics]}
    assert chart_series(page, "loss") == {"x": [1, 2], "y": [m["loss"] for m in metrics]}
    assert page.evaluate("""document.querySelector('[data-chart="reward"]').uplot.data[0]""") == [1, 2]
    assert page.get_attribute('[data-chart="kl"]', "data-points") == "0"  # the stand-in logs no KL
    page.wait_for_selector('#logs[data-ended="COMPLETED"]')
    assert "step 2" in page.text_content("#logs")
    statuses = page.eval_on_selector_all("#timeline li", "els => els.map(e => e.dataset.status)")
    assert statuses[0] == "PENDING" and statuses[-1] == "COMPLETED" and "RUNNING" in statuses
    page.wait_for_selector("#samples .sample")
    assert page.text_content("#samples .sample .completion") == "hi"
    assert page.input_value("#completion-step") == "2"
    page.select_option("#completion-step", "1")
    page.wait_for_selector('#samples[data-step="1"] .sample')
    assert not page.query_selector("#cancel")  # a finished run has no cancel button
    shot(page, tmp_path, "run")


def test_live_logs_and_charts_arrive_then_cancel(live, page, tmp_path):
    key = live.key("alice")
    with live.client(key) as c:
        run_id = start_run(c, upload_task(c), "sleep=16,code=0")  # step 1 at once, step 2 after 8 s, ends at 16 s
        wait_status(c, run_id, {"RUNNING"})
        sign_in(page, live, key, f"#/runs/{run_id}")
        page.wait_for_selector("#logs .line")
        page.wait_for_function("() => document.querySelector('#logs').textContent.includes('step 1')")
        assert "step 2" not in page.text_content("#logs")  # not written yet: what follows arrives live
        assert page.get_attribute('[data-chart="reward"]', "data-points") == "1"
        assert page.text_content("#log-state") == "live"
        page.wait_for_function("() => document.querySelector('#logs').textContent.includes('step 2')", timeout=30_000)
        page.wait_for_selector('[data-chart="reward"][data-points="2"]', timeout=10_000)
        shot(page, tmp_path, "run-live")
        assert c.get(f"/runs/{run_id}").json()["data"]["status"] == "RUNNING"
        page.click("#cancel")
        page.wait_for_selector('#run-head .badge[data-status="CANCELLED"]', timeout=30_000)
        page.wait_for_selector('#logs[data-ended="CANCELLED"]', timeout=10_000)
        assert c.get(f"/runs/{run_id}").json()["data"]["status"] == "CANCELLED"
        page.wait_for_selector('#timeline li[data-status="CANCELLED"]')
        shot(page, tmp_path, "run-cancelled")


def test_user_strings_render_as_text_never_html(live, page, tmp_path):
    key = live.key("alice")
    with live.client(key) as c:
        files = upload_task(c, prompt_name=XSS)
        run_id = start_run(c, files, XSS)  # the stand-in cannot parse this name, so the run fails: fine
        wait_status(c, run_id, {"FAILED", "COMPLETED"})
    sign_in(page, live, key)
    page.wait_for_selector(f'tr[data-run-id="{run_id}"] td.name')
    assert page.text_content(f'tr[data-run-id="{run_id}"] td.name') == XSS
    shot(page, tmp_path, "xss-runs")
    page.goto(root(live) + f"#/runs/{run_id}")
    page.wait_for_selector("#run-name")
    assert page.text_content("#run-name") == XSS
    assert XSS in page.text_content("#run-head")  # the prompt file's name, among the run's files
    page.goto(root(live) + "#/files")
    page.wait_for_selector("#files-table td.name")
    assert XSS in page.eval_on_selector_all("#files-table td.name", "els => els.map(e => e.textContent)")
    shot(page, tmp_path, "xss-files")
    page.goto(root(live) + "#/new")
    page.wait_for_selector("#new-run")
    assert XSS in page.text_content("#new-run select[name=prompt_file_id]")
    assert page.evaluate("window.__xss") is None
    assert page.evaluate("document.querySelectorAll('#view img').length") == 0  # no element made from the strings


def test_upload_with_validation_and_the_other_pages(live, page, tmp_path):
    key = live.key("alice")
    sign_in(page, live, key, "#/files")
    bad, good = tmp_path / "bad.jsonl", tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "hi"}]}\nnot json\n')
    good.write_text(PROMPTS)
    page.set_input_files("#upload-file", str(bad))
    page.click("#upload button[type=submit]")
    page.wait_for_selector('#upload-result #validation[data-valid="false"]')
    assert "line 2" in page.text_content("#upload-result #validation").lower()
    page.set_input_files("#upload-file", str(good))
    page.click("#upload button[type=submit]")
    page.wait_for_selector('#upload-result #validation[data-valid="true"]')
    page.wait_for_selector("#preview ol.preview li")
    assert "Say hi" in page.text_content("#preview")
    shot(page, tmp_path, "files")
    page.goto(root(live) + "#/keys")
    page.wait_for_selector("#keys-table td.name")
    page.fill("#key-name", "from the dashboard")
    page.click("#create-key button[type=submit]")
    token = page.input_value("#new-token", timeout=10_000)
    with live.client(token) as c:  # the key made on the page works, with the scopes chosen there
        assert c.get("/health").status_code == 200
    shot(page, tmp_path, "keys")
    page.goto(root(live) + "#/tools")
    page.fill("#mcp-url", "http://127.0.0.1:9/mcp")  # loopback: refused by the destination policy, with its reason
    page.click("#test-mcp button[type=submit]")
    page.wait_for_selector("#mcp-result .error")
    assert "mcp_url" in page.text_content("#mcp-result")
    shot(page, tmp_path, "tools")
    with live.client(key) as c:
        p_id, r_id = upload_task(c)
        r = c.post("/shared-configurations", json={"name": "Support tone", "visibility": "public",
                                                     "prompt_file_id": p_id, "reward_file_id": r_id,
                                                     "configuration": {"model": "builtin:tiny", "epochs": 2}})
        assert r.status_code == 201, r.text
        uuid = r.json()["data"]["uuid"]
    page.goto(root(live) + "#/shared")
    page.wait_for_selector("#shared-mine td.name")
    assert "Support tone" in page.text_content("#shared-mine")
    shot(page, tmp_path, "shared")
    # the shareable link opens the new-run form with the configuration
    page.goto(root(live) + f"runs/create?config={uuid}")
    page.wait_for_selector("#new-run")
    assert page.input_value("#new-run input[name=epochs]") == "2"
    assert page.input_value("#new-run select[name=prompt_file_id]") == p_id
    shot(page, tmp_path, "new-run")
    page.click("#new-run button[type=submit]")
    page.wait_for_selector("#run-head")
    assert page.url.split("#/runs/")[1].isdigit()
    with live.client(key) as c:  # the key is revoked while the page polls: the page goes back to sign-in
        mine = next(k for k in c.get("/keys").json()["data"] if key.startswith(k["masked_key"][:11]))
        assert c.delete(f"/keys/{mine['id']}").status_code == 200
    page.goto(root(live) + "#/runs")
    page.wait_for_selector("#signin", timeout=30_000)
    assert page.evaluate("sessionStorage.length") == 0


@pytest.mark.slow
def test_deploy_chat_and_download_model(live, page, tmp_path, tiny_model_dir):
    from tests.server.test_deploy_auth import _completed_run

    key = live.key("alice")
    run_id = _completed_run(live.app.state.services.store, live.settings.runs_dir, tiny_model_dir)
    sign_in(page, live, key, f"#/runs/{run_id}")
    with page.expect_download() as info:
        page.click("#download")
    archive = Path(info.value.path())
    with tarfile.open(fileobj=io.BytesIO(archive.read_bytes()), mode="r:gz") as tar:
        names = tar.getnames()
        assert "final/config.json" in names
        assert json.loads(tar.extractfile("final/config.json").read()) == json.loads(
            (tiny_model_dir / "config.json").read_text())
    page.click("#deploy")
    page.wait_for_selector("#deployment-head")
    page.wait_for_selector('#deployment-status[data-status="active"]', timeout=120_000)
    page.fill("#chat-input", "Say hi")
    page.fill("#max-tokens", "8")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answer:
        page.click("#chat-send")
    assert answer.value.status == 200
    assert answer.value.headers["content-type"].startswith("text/event-stream")  # streamed, not one JSON body
    assert json.loads(answer.value.request.post_data)["stream"] is True
    page.wait_for_selector('.bubble.assistant[data-streaming="false"]', timeout=120_000)
    reply = page.text_content(".bubble.assistant .content")
    assert reply and reply != "(no answer)", reply
    assert int(page.get_attribute(".bubble.assistant", "data-chunks")) >= 1
    assert not page.query_selector("#chat .error")
    shot(page, tmp_path, "deployment")
    page.goto(root(live) + "#/deployments")
    page.wait_for_selector(".badge.dep-active")
    shot(page, tmp_path, "deployments")
    with live.client(key) as c:
        deps = c.get("/deployments").json()["data"]["items"]
        assert [d["run_id"] for d in deps] == [run_id]
        c.delete(f"/deployments/{deps[0]['id']}")
