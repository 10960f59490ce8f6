// API keys: the caller's keys (GET /keys: masked, scopes, quota, usage), create one (POST /keys: its token is
// shown once), deactivate (PUT active=false) and delete. The server's rules on escalation apply as for any client.

import { api, getKey } from "../api.js";
import { clear, errorBox, field, fill, fmtTime, h, section, table, toast } from "../dom.js";

export async function render(view) {
  const name = h("input", { name: "name", required: true, id: "key-name" });
  const scopes = ["read", "write", "admin"].map(s => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "scopes", value: s, checked: s !== "admin" }), ` ${s}`));
  const expires = h("input", { name: "expires_at", type: "date" });
  const rate = h("input", { name: "requests_per_hour", type: "number", min: 1, placeholder: "default" });
  const out = h("div", { id: "new-key" });
  const form = h("form", { class: "form-grid", id: "create-key" }, field("Name", name),
    field("Scopes", h("span", {}, scopes)), field("Expires", expires), field("Requests per hour", rate),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Create key")), out);
  const listOut = h("div", { id: "keys-table" });
  view.append(section("API keys", listOut), section("Create a key", form));
  const mine = getKey() || "";

  async function load() {
    const keys = await api("GET", "/keys");
    fill(listOut, table([
      { title: "Name", cell: k => k.name, cls: "name" },
      { title: "Key", cell: k => h("code", {}, k.masked_key, mine.startsWith(k.masked_key.slice(0, 11)) ? " (this one)" : "") },
      { title: "Scopes", cell: k => k.scopes.join(", ") },
      { title: "Active", cell: k => (k.active ? "yes" : "no") },
      { title: "Requests / h", cell: k => `${k.remaining_requests} left of ${k.requests_per_hour}`, cls: "num" },
      { title: "Total", cell: k => String(k.total_requests), cls: "num" },
      { title: "Last used", cell: k => fmtTime(k.last_used_at) },
      { title: "Expires", cell: k => fmtTime(k.expires_at) },
      { title: "", cell: k => h("span", { class: "actions" },
        k.active ? h("button", { class: "secondary", onclick: () => change("PUT", k, { active: false }, "Key deactivated") }, "Deactivate") : null,
        h("button", { class: "danger", onclick: () => { if (confirm(`Delete key ${k.name}?`)) change("DELETE", k, undefined, "Key deleted"); } }, "Delete")) },
    ], keys));
  }

  async function change(method, k, body, done) {
    try { await api(method, `/keys/${k.id}`, { body }); toast(done); await load(); } catch (err) { toast(err.message, "error"); }
  }

  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    clear(out);
    const body = { name: name.value.trim(), scopes: scopes.map(l => l.firstChild).filter(i => i.checked).map(i => i.value) };
    if (expires.value) body.expires_at = expires.value;
    if (rate.value) body.requests_per_hour = Number(rate.value);
    try {
      const created = await api("POST", "/keys", { body });
      out.append(h("div", { class: "ok" }, h("p", {}, created.warning),
        h("input", { class: "token", readonly: true, value: created.token, id: "new-token", onfocus: e => e.target.select() })));
      await load();
    } catch (err) { out.append(errorBox(err)); }
  });
  await load();
}
