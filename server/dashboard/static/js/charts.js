// Per-step charts of a run's metrics (GET /runs/{id}/metrics) with the vendored uPlot. Each chart's element
// carries what it plots: `data-points` (how many steps have a value) and `data-series` (JSON {x, y}: the steps and
// the main series' values, null where a step has none), and the uPlot instance as `el.uplot`.

import { clear, fill, h } from "./dom.js";

export const CHARTS = [
  { id: "reward", title: "Reward (mean ± std)", key: "reward_mean", std: "reward_std" },
  { id: "eval_reward", title: "Eval reward", key: "eval_reward_mean" },
  { id: "kl", title: "KL", key: "kl" },
  { id: "loss", title: "Loss", key: "loss" },
  { id: "completion_length", title: "Completion length (tokens)", key: "completion_length_mean" },
  { id: "step_time", title: "Step time (s)", key: "step_time_s" },
];

const STEP_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000, 100000];
const COLORS = { line: "#2563eb", band: "rgba(37, 99, 235, 0.15)", edge: "rgba(37, 99, 235, 0.35)" };

// metrics.jsonl records -> one merged record per step (an eval record and a train record of the same step merge).
export function perStep(history) {
  const byStep = new Map();
  for (const r of history || []) {
    const step = r.step ?? r._step;
    if (typeof step !== "number") continue;
    byStep.set(step, { ...(byStep.get(step) || {}), ...r });
  }
  return [...byStep.keys()].sort((a, b) => a - b).map(s => byStep.get(s));
}

// A flat series (KL of 0 at every step) gets a small band around its value, not uPlot's default 0..100.
function yRange(u, min, max) {
  if (min === null || max === null) return [0, 1];
  if (min === max) { const pad = Math.abs(min) * 0.1 || 1; return [min - pad, max + pad]; }
  return window.uPlot.rangeNum(min, max, 0.1, true);
}

function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }

export class ChartGrid {
  constructor() {
    this.el = h("div", { class: "charts" });
    this.cells = CHARTS.map(spec => {
      const plot = h("div", { class: "plot", dataset: { chart: spec.id, points: "0" } });
      const cell = h("figure", { class: "chart" }, h("figcaption", {}, spec.title), plot);
      this.el.append(cell);
      return { spec, plot, uplot: null, width: 0 };
    });
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(this.el);
  }

  width(cell) { return Math.max(200, Math.floor(cell.plot.clientWidth || 320)); }

  resize() {
    for (const c of this.cells) if (c.uplot && this.width(c) !== c.width) {
      c.width = this.width(c);
      c.uplot.setSize({ width: c.width, height: 170 });
    }
  }

  update(history) {
    const records = perStep(history);
    for (const c of this.cells) this.draw(c, records);
  }

  draw(c, records) {
    const { spec, plot } = c;
    const rows = records.filter(r => num(r[spec.key]) !== null);
    const x = rows.map(r => r.step ?? r._step);
    const y = rows.map(r => num(r[spec.key]));
    plot.dataset.points = String(rows.length);
    plot.dataset.series = JSON.stringify({ x, y });
    if (!rows.length) {
      if (c.uplot) { c.uplot.destroy(); c.uplot = null; }
      fill(plot, h("p", { class: "muted empty" }, "no data yet"));
      return;
    }
    const data = [x, y];
    const series = [{ label: "step" }, { label: spec.std ? "mean" : "value", stroke: COLORS.line, width: 2, points: { show: rows.length < 60 } }];
    const bands = [];
    if (spec.std) {
      const sd = rows.map(r => num(r[spec.std]) ?? 0);
      data.push(y.map((v, i) => v + sd[i]), y.map((v, i) => v - sd[i]));
      series.push({ label: "+std", stroke: COLORS.edge, width: 1, points: { show: false } },
                  { label: "−std", stroke: COLORS.edge, width: 1, points: { show: false } });
      bands.push({ series: [2, 1], fill: COLORS.band }, { series: [1, 3], fill: COLORS.band });
    }
    if (c.uplot && c.uplot.series.length === series.length) {
      c.uplot.setData(data);
      return;
    }
    if (c.uplot) c.uplot.destroy();
    clear(plot);
    c.width = this.width(c);
    c.uplot = new window.uPlot({
      width: c.width, height: 170, series, bands,
      scales: { x: { time: false }, y: { range: yRange } },
      axes: [{ label: "step", size: 36, incrs: STEP_INCRS }, { size: 56 }],
      legend: { show: true, live: true },
      cursor: { drag: { x: true, y: false } },
    }, data, plot);
    plot.uplot = c.uplot;
  }

  destroy() {
    this.observer.disconnect();
    for (const c of this.cells) if (c.uplot) c.uplot.destroy();
  }
}
