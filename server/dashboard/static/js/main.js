// The dashboard's shell: sign-in with an API key, hash routing (#/runs, #/runs/12, #/files, ...), and the nav.

import { api, clearKey, getKey, setKey } from "./api.js";
import { clear, errorBox, field, h } from "./dom.js";
import * as runs from "./pages/runs.js";
import * as run from "./pages/run.js";
import * as newRun from "./pages/new.js";
import * as files from "./pages/files.js";
import * as tools from "./pages/tools.js";
import * as shared from "./pages/shared.js";
import * as keys from "./pages/keys.js";
import * as deployments from "./pages/deployments.js";

const ROUTES = [
  [/^runs$/, runs.render, "runs"],
  [/^runs\/(\d+)$/, run.render, "runs"],
  [/^new$/, newRun.render, "new"],
  [/^files$/, files.render, "files"],
  [/^tools$/, tools.render, "tools"],
  [/^shared$/, shared.render, "shared"],
  [/^keys$/, keys.render, "keys"],
  [/^deployments$/, deployments.renderList, "deployments"],
  [/^deployments\/(\d+)$/, deployments.render, "deployments"],
];

const view = document.getElementById("view");
let cleanup = null;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, qs] = raw.split("?");
  return { path: path || "runs", query: new URLSearchParams(qs || "") };
}

async function signIn(view) {
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("whoami").textContent = "";
  const input = h("input", { type: "password", name: "api_key", autocomplete: "off", placeholder: "rl_xxxxxxxx_…",
                             required: true, id: "api-key" });
  const out = h("div");
  const form = h("form", { class: "card signin", id: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API key (runrl keys create, or the Keys page). It stays in this browser tab " +
      "only and is sent as a Bearer token to this server's REST API; what it can see and do is what its scopes allow."),
    field("API key", input), h("button", { type: "submit" }, "Sign in"), out);
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    clear(out);
    const key = input.value.trim();
    try {
      await api("GET", "/health", { key });
      setKey(key);
      route();
    } catch (err) {
      out.append(errorBox(err));
    }
  });
  view.append(form);
  input.focus();
}

async function route() {
  if (cleanup) { try { cleanup(); } catch (e) { console.warn(e); } cleanup = null; }
  clear(view);
  window.scrollTo(0, 0);
  if (!getKey()) return signIn(view);
  const { path, query } = parseHash();
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = false;
  const key = getKey();
  document.getElementById("whoami").textContent = `key ${key.slice(0, 11)}…`;
  for (const a of document.querySelectorAll("#nav a")) a.classList.remove("active");
  for (const [pattern, render, page] of ROUTES) {
    const m = path.match(pattern);
    if (!m) continue;
    const link = document.querySelector(`#nav a[data-page="${page}"]`);
    if (link) link.classList.add("active");
    document.body.dataset.page = page;
    try {
      cleanup = (await render(view, { params: m.slice(1), query })) || null;
    } catch (err) {
      view.append(errorBox(err));
    }
    return;
  }
  view.append(h("div", { class: "card" }, h("h1", {}, "Not found"), h("a", { href: "#/runs" }, "Back to runs")));
}

document.getElementById("signout").addEventListener("click", () => { clearKey(); location.hash = "#/runs"; route(); });
let checking = false;
window.addEventListener("runrl:unauthorized", () => {
  // a revoked or expired key: back to sign-in (checked once with the stored key; a refused sign-in attempt
  // or a call without a key triggers nothing more)
  if (checking || !getKey()) return;
  checking = true;
  api("GET", "/health").then(() => { checking = false; }, err => {
    checking = false;
    if (err.status === 401 && getKey()) { clearKey(); route(); }
  });
});
window.addEventListener("hashchange", route);
route();
