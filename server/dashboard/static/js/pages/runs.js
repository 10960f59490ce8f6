// Runs: a table (status, model, progress, reward, started, duration) with a status filter and paging,
// refreshed every few seconds. The reward column is the last step's reward_mean (GET /runs/{id}/metrics):
// fetched once for a finished run and on each refresh for an active one.

import { api, poll } from "../api.js";
import { errorBox, fill, fmtDuration, fmtNum, fmtTime, h, select, statusBadge, table } from "../dom.js";

const STATUSES = ["", "PENDING", "SETTING_UP", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"];
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
const REFRESH_MS = 4000;
const rewards = new Map();  // run id -> last reward_mean of a finished run (they no longer change)

function progress(run) {
  const pct = Math.round((run.progress || 0) * 100);
  const bar = h("span", { class: "bar" });
  bar.style.width = `${pct}%`;
  const steps = run.total_steps ? `${run.current_step ?? 0}/${run.total_steps}` : "";
  return h("span", { class: "progress", title: `${pct}%`, dataset: { progress: String(pct) } },
    h("span", { class: "track" }, bar), h("span", { class: "muted" }, `${pct}% ${steps}`));
}

async function reward(run) {
  if (rewards.has(run.id)) return rewards.get(run.id);
  if (run.status === "PENDING") return null;
  const m = await api("GET", `/runs/${run.id}/metrics`);
  const last = [...(m.history || [])].reverse().find(r => typeof r.reward_mean === "number");
  const value = last ? last.reward_mean : null;
  if (TERMINAL.has(run.status)) rewards.set(run.id, value);
  return value;
}

export async function render(view, { query }) {
  const state = { status: query.get("status") || "", page: Number(query.get("page")) || 1 };
  const filter = select(STATUSES.map(s => [s, s || "All statuses"]), state.status, { id: "status-filter",
                                                                                    "aria-label": "Status" });
  const pager = h("span", { class: "pager" });
  const holder = h("div", { id: "runs-table" });
  const updated = h("small", { class: "muted" });
  view.append(h("section", { class: "card" },
    h("div", { class: "toolbar" }, h("h1", {}, "Runs"), filter, h("span", { class: "spacer" }), updated,
      h("a", { class: "button", href: "#/new" }, "New run")),
    holder, pager));

  async function load() {
    const data = await api("GET", "/runs", { query: { status: state.status, page: state.page, per_page: 20 } });
    const values = await Promise.all(data.items.map(r => reward(r).catch(() => null)));
    const byId = new Map(data.items.map((r, i) => [r.id, values[i]]));
    const grid = table([
      { title: "ID", cell: r => h("a", { href: `#/runs/${r.id}` }, `#${r.id}`) },
      { title: "Status", cell: r => statusBadge(r.status) },
      { title: "Name", cell: r => (r.parameters && r.parameters.run_name) || "", cls: "name" },
      { title: "Model", cell: r => r.model, cls: "mono" },
      { title: "Progress", cell: progress },
      { title: "Reward", cell: r => fmtNum(byId.get(r.id)), cls: "num" },
      { title: "Started", cell: r => fmtTime(r.started_at) },
      { title: "Duration", cell: r => fmtDuration(r.duration_seconds), cls: "num" },
    ], data.items, r => ({ dataset: { runId: String(r.id), status: r.status }, class: "clickable",
                           onclick: ev => { if (ev.target.tagName !== "A") location.hash = `#/runs/${r.id}`; } }));
    fill(holder, grid);
    const p = data.pagination;
    fill(pager, 
      h("button", { class: "secondary", disabled: p.current_page <= 1, onclick: () => { state.page--; load(); } }, "‹ Prev"),
      ` page ${p.current_page} of ${p.last_page} (${p.total} runs) `,
      h("button", { class: "secondary", disabled: p.current_page >= p.last_page,
                    onclick: () => { state.page++; load(); } }, "Next ›"));
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  filter.addEventListener("change", () => {
    state.status = filter.value;
    state.page = 1;
    history.replaceState(null, "", `#/runs${state.status ? `?status=${state.status}` : ""}`);
    load().catch(err => fill(holder, errorBox(err)));
  });
  return poll(() => load().catch(err => fill(holder, errorBox(err))), REFRESH_MS);
}
