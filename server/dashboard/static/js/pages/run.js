// One run: its details and actions (cancel, deploy, download the model), status timeline (GET /runs/{id}/history),
// live logs over the SSE stream (GET /runs/{id}/logs/stream), live per-step charts (GET /runs/{id}/metrics) and a
// completions browser (GET /runs/{id}/completions). Everything refreshes while the run is active and stops once
// it has finished.

import { api, download, poll, sse } from "../api.js";
import { ChartGrid } from "../charts.js";
import { clear, errorBox, fill, fmtDuration, fmtNum, fmtTime, h, json, section, statusBadge, toast } from "../dom.js";

const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
const ACTIVE = new Set(["PENDING", "SETTING_UP", "RUNNING"]);
const REFRESH_MS = 3000;
const MAX_LOG_LINES = 5000;
const SHOWN = 8;  // completions shown per step before "Show all"

function text(content) {
  if (content === null || content === undefined) return "";
  return typeof content === "string" ? content : JSON.stringify(content, null, 2);
}

// A chat message (prompt or multi-turn transcript), its tool calls shown as JSON.
export function message(m) {
  const box = h("div", { class: `msg role-${String(m.role || "unknown").replace(/[^a-z_]/gi, "")}` },
    h("div", { class: "role" }, m.role || "?", m.name ? ` (${m.name})` : "", m.tool_call_id ? ` ← ${m.tool_call_id}` : ""),
    h("pre", { class: "content" }, text(m.content)));
  for (const call of m.tool_calls || []) {
    const fn = call.function || call;
    box.append(h("div", { class: "tool-call" }, h("span", { class: "role" }, "tool call "), h("code", {}, fn.name || "?"),
      h("pre", { class: "content" }, text(fn.arguments))));
  }
  return box;
}

function sample(s, i) {
  const card = h("article", { class: "sample", dataset: { index: String(i) } },
    h("header", {}, h("strong", {}, `#${i + 1}`), " reward ", h("span", { class: "reward" }, fmtNum(s.reward)),
      s.finished === false ? h("span", { class: "badge" }, "unfinished") : null,
      s.turns ? h("span", { class: "muted" }, ` ${s.turns} turns`) : null,
      s.tool_calls ? h("span", { class: "muted" }, ` ${s.tool_calls} tool calls`) : null,
      s.error ? h("span", { class: "badge status-failed" }, "error") : null));
  const prompt = Array.isArray(s.prompt) ? s.prompt : s.prompt ? [{ role: "user", content: s.prompt }] : [];
  if (Array.isArray(s.messages) && s.messages.length) {
    card.append(h("div", { class: "label" }, "Transcript"), ...s.messages.map(message));
  } else {
    card.append(h("div", { class: "label" }, "Prompt"), ...prompt.map(message),
                h("div", { class: "label" }, "Completion"), h("pre", { class: "completion" }, text(s.completion)));
  }
  if (s.step_rewards) card.append(h("div", { class: "label" }, "Step rewards"), h("code", {}, JSON.stringify(s.step_rewards)));
  if (s.error) card.append(h("div", { class: "label" }, "Error"), h("pre", { class: "error-text" }, text(s.error)));
  if (s.info && Object.keys(s.info).length) {
    const flat = JSON.stringify(s.info);
    card.append(h("div", { class: "label" }, "Info"), flat.length <= 100 ? h("code", { class: "info" }, flat) : json(s.info));
  }
  return card;
}

export async function render(view, { params }) {
  const id = Number(params[0]);
  let stopped = false;
  const stops = [];
  const head = h("section", { class: "card", id: "run-head" });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const charts = new ChartGrid();
  const logs = h("pre", { class: "logs", id: "logs", tabindex: "0" });
  const logState = h("small", { class: "muted", id: "log-state" }, "connecting…");
  const stepSelect = h("select", { id: "completion-step", "aria-label": "Step" });
  const samples = h("div", { id: "samples", class: "samples" });
  const actionsOut = h("div");
  view.append(head,
    h("div", { class: "columns" },
      h("div", { class: "wide" }, section("Metrics", charts.el)),
      h("div", { class: "narrow" }, section("Status timeline", timeline))),
    h("section", { class: "card" }, h("div", { class: "toolbar" }, h("h2", {}, "Logs"), h("span", { class: "spacer" }),
      logState), logs),
    h("section", { class: "card" }, h("div", { class: "toolbar" }, h("h2", {}, "Completions"), stepSelect,
      h("span", { class: "spacer" })), samples));

  let run = null;

  function renderHead() {
    const r = run;
    const name = (r.parameters && r.parameters.run_name) || "";
    const files = ["prompt_file", "reward_file", "sft_file"].filter(k => r[k])
      .map(k => h("span", { class: "file-ref" }, `${k.replace("_file", "")}: `, r[k].name || r[k].id));
    const dl = (k, v) => h("div", {}, h("dt", {}, k), h("dd", {}, v));
    // the push of final/ to the Hugging Face Hub (a failed one also fills error_message, shown below)
    const hubPush = p => p.status === "pushed" && /^https?:\/\//.test(p.url || "")
      ? h("a", { href: p.url, target: "_blank", rel: "noopener noreferrer" }, p.repo_id)
      : `${p.repo_id} (${p.status === "pending" ? "pushed when the run completes" : `not pushed: ${p.status}`})`;
    const paramsOpen = !!(head.querySelector("details") || {}).open;
    const buttons = h("div", { class: "actions" });
    if (ACTIVE.has(r.status)) buttons.append(h("button", { id: "cancel", class: "danger", onclick: cancel }, "Cancel run"));
    if (r.status === "COMPLETED") {
      buttons.append(h("button", { id: "deploy", onclick: deploy }, "Deploy"),
                     h("button", { id: "download", class: "secondary", onclick: downloadModel }, "Download model"));
    }
    fill(head, 
      h("div", { class: "toolbar" }, h("h1", {}, `Run #${r.id}`), statusBadge(r.status),
        name ? h("span", { class: "run-name", id: "run-name" }, name) : null, h("span", { class: "spacer" }), buttons),
      h("dl", { class: "meta" },
        dl("Model", h("code", {}, r.model)), dl("Type", r.type),
        dl("Progress", `${Math.round((r.progress || 0) * 100)}%` +
          (r.total_steps ? ` (step ${r.current_step ?? 0} of ${r.total_steps})` : "")),
        dl("Created", fmtTime(r.created_at)), dl("Started", fmtTime(r.started_at)),
        dl("Finished", fmtTime(r.completed_at)), dl("Duration", fmtDuration(r.duration_seconds)),
        files.length ? dl("Files", files) : null,
        r.tools && r.tools.length ? dl("Tools", r.tools.map(t => h("span", { class: "file-ref" }, t.name || t.mcp_url || t.id))) : null,
        r.wandb_url ? dl("W&B", h("a", { href: r.wandb_url, target: "_blank", rel: "noopener noreferrer" }, r.wandb_url)) : null,
        r.hf_push ? dl("Hub", hubPush(r.hf_push)) : null),
      r.error_message ? h("pre", { class: "error-text", id: "run-error" }, r.error_message) : null,
      h("details", { open: paramsOpen }, h("summary", {}, "Parameters"), json(r.parameters)),
      actionsOut);
  }

  async function cancel() {
    try {
      run = await api("POST", `/runs/${id}/cancel`);
      toast("Cancellation requested");
      renderHead();
    } catch (err) { fill(actionsOut, errorBox(err)); }
  }

  async function deploy() {
    clear(actionsOut);
    try {
      const check = await api("POST", "/deployments/check", { body: { run_id: id } });
      if (!check.deployable) {
        const live = (check.reasons || []).join("; ").match(/deployment (\d+)/);
        actionsOut.append(h("div", { class: "error" }, (check.reasons || []).join("; "),
          live ? h("a", { href: `#/deployments/${live[1]}` }, ` open deployment ${live[1]}`) : null));
        return;
      }
      const dep = await api("POST", "/deployments", { body: { run_id: id } });
      location.hash = `#/deployments/${dep.id}`;
    } catch (err) { actionsOut.append(errorBox(err)); }
  }

  async function downloadModel(ev) {
    const button = ev.currentTarget;
    button.disabled = true;
    button.textContent = "Preparing…";
    try {
      await download(`/runs/${id}/model`, `run-${id}-model.tar.gz`);
    } catch (err) { fill(actionsOut, errorBox(err)); }
    button.disabled = false;
    button.textContent = "Download model";
  }

  async function refreshTimeline() {
    const data = await api("GET", `/runs/${id}/history`);
    fill(timeline, ...data.history.map(e => h("li", { dataset: { status: e.status } }, statusBadge(e.status),
      h("span", { class: "when" }, fmtTime(e.timestamp)), e.message ? h("div", { class: "muted" }, e.message) : null)));
  }

  let steps = [];
  async function refreshSteps() {
    const data = await api("GET", `/runs/${id}/completions`, { query: { limit: 1 } });
    const found = data.steps.map(s => s.step);
    if (found.join() === steps.join()) return;
    const following = !stepSelect.value || Number(stepSelect.value) === steps[steps.length - 1];
    steps = found;
    const current = following ? String(steps[steps.length - 1] ?? "") : stepSelect.value;
    fill(stepSelect, ...steps.map(s => h("option", { value: String(s), selected: String(s) === current }, `step ${s}`)));
    if (!steps.length) fill(samples, h("p", { class: "muted" }, "No completions logged yet."));
    else if (following) await showStep(current);
  }

  async function showStep(step) {
    const data = await api("GET", `/runs/${id}/completions`, { query: { step, limit: 64 } });
    const list = (data.steps[0] && data.steps[0].samples) || [];
    const rewards = list.map(x => x.reward).filter(r => typeof r === "number");
    const mean = rewards.length ? rewards.reduce((a, b) => a + b, 0) / rewards.length : null;
    fill(samples, h("p", { class: "muted summary" }, `${list.length} samples logged at step ${step}`,
      mean === null ? "" : `, mean reward ${fmtNum(mean)}`), ...list.slice(0, SHOWN).map(sample));
    if (list.length > SHOWN) {
      samples.append(h("button", { class: "secondary more", onclick: ev => {
        ev.currentTarget.replaceWith(...list.slice(SHOWN).map((x, i) => sample(x, i + SHOWN)));
      } }, `Show all ${list.length}`));
    }
    samples.dataset.step = String(step);
  }
  stepSelect.addEventListener("change", () => showStep(stepSelect.value).catch(err => fill(samples, errorBox(err))));

  async function refresh() {
    run = await api("GET", `/runs/${id}`);
    renderHead();
    const [metrics] = await Promise.all([api("GET", `/runs/${id}/metrics`), refreshTimeline(), refreshSteps()]);
    charts.update(metrics.history);
    view.dataset.runStatus = run.status;
    return !TERMINAL.has(run.status);  // one last refresh after the run ends, then stop
  }

  // Live logs: the SSE stream sends every line from the start, then new ones, then `event: end`.
  const abort = new AbortController();
  async function followLogs() {
    let lines = [];
    for (let attempt = 0; !stopped; attempt++) {
      lines = [];
      clear(logs);
      logState.textContent = attempt ? "reconnecting…" : "live";
      let ended = false;
      try {
        await sse(`/runs/${id}/logs/stream`, { signal: abort.signal, onEvent: ev => {
          if (ev.event === "end") {
            ended = true;
            let status = "";
            try { status = JSON.parse(ev.data).status; } catch (e) { /* keep going */ }
            logState.textContent = `ended (${status})`;
            logs.dataset.ended = status;
            return;
          }
          const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 8;
          lines.push(ev.data);
          logs.append(h("span", { class: "line" }, ev.data), "\n");
          if (lines.length > MAX_LOG_LINES) { logs.firstChild.remove(); logs.firstChild.remove(); lines.shift(); }
          logs.dataset.lines = String(lines.length);
          if (atBottom) logs.scrollTop = logs.scrollHeight;
        } });
      } catch (err) {
        if (stopped) return;
        logState.textContent = `disconnected: ${err.message}`;
        if (err.status && err.status < 500 && err.status !== 429) return;
      }
      if (ended || stopped) return;
      await new Promise(r => setTimeout(r, REFRESH_MS));
    }
  }

  let active;
  try {
    active = await refresh();
  } catch (err) {
    view.prepend(errorBox(err));
    if (!run) return () => charts.destroy();
  }
  followLogs();
  if (active !== false) stops.push(poll(refresh, REFRESH_MS, false));
  return () => {
    stopped = true;
    abort.abort();
    stops.forEach(s => s());
    charts.destroy();
  };
}
