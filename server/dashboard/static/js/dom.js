// DOM building without innerHTML: every string becomes a text node or an attribute value, so data from the API
// (file names, run names, completions, log lines) is shown as text and never parsed as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "value") el.value = value;
    else if (name === "checked" || name === "disabled" || name === "hidden" || name === "selected") el[name] = !!value;
    else if (name === "href") el.setAttribute("href", safeHref(value));
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

// Links from data (a W&B URL) only when they are http(s); hash links are the dashboard's own.
export function safeHref(value) {
  const s = String(value);
  if (s.startsWith("#")) return s;
  try {
    const url = new URL(s, document.baseURI);
    if (url.protocol === "http:" || url.protocol === "https:" || url.protocol === "blob:") return url.href;
  } catch (e) { /* fall through */ }
  return "#";
}

export function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Math.round(seconds));
  const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
  return hh ? `${hh}h ${mm}m` : mm ? `${mm}m ${ss}s` : `${ss}s`;
}

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || typeof x !== "number" || !isFinite(x)) return "—";
  return Math.abs(x) >= 1000 ? x.toFixed(0) : Number(x.toPrecision(digits + 1)).toString();
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${String(status).toLowerCase()}`, dataset: { status } }, status);
}

export function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

export function toast(message, kind = "info") {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.className = `toast-${kind}`;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, kind === "error" ? 8000 : 3500);
}

// A message box for an API error: the envelope's message, then each field of `details` on its own line.
export function errorBox(err) {
  const box = h("div", { class: "error", role: "alert" }, String(err && err.message ? err.message : err));
  if (err && err.details && typeof err.details === "object") {
    const message = String(err.message || "");
    const list = h("ul");
    for (const [k, v] of Object.entries(err.details)) {
      const text = typeof v === "string" ? v : JSON.stringify(v);
      if (!message.includes(text)) list.append(h("li", {}, h("code", {}, k), ": ", text));  // not said twice
    }
    if (list.childElementCount) box.append(list);
  }
  return box;
}

export function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", {}, label), input, hint ? h("small", { class: "muted" }, hint) : null);
}

export function select(options, value, attrs = {}) {
  const el = h("select", attrs);
  for (const opt of options) {
    const [v, text] = Array.isArray(opt) ? opt : [opt, opt];
    el.append(h("option", { value: v, selected: v === value }, text));
  }
  return el;
}

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

export function table(columns, rows, rowAttrs) {
  const head = h("tr", {}, columns.map(c => h("th", {}, c.title)));
  const body = h("tbody");
  for (const row of rows) {
    body.append(h("tr", rowAttrs ? rowAttrs(row) : {}, columns.map(c => h("td", { class: c.cls || null }, c.cell(row)))));
  }
  if (!rows.length) body.append(h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, "Nothing here yet.")));
  return h("table", { class: "grid" }, h("thead", {}, head), body);
}

// Replaces el's children (null/false/undefined children are skipped, never shown as text).
export function fill(el, ...children) {
  return append(clear(el), children);
}
