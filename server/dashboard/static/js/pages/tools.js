// Tools: test an MCP URL (POST /tools/test-mcp: the handshake's diagnostics), register one (POST /tools),
// the list of the caller's and public tools, delete one's own.

import { api } from "../api.js";
import { clear, errorBox, field, fill, fmtTime, h, json, section, table, toast } from "../dom.js";

export async function render(view) {
  const testUrl = h("input", { name: "mcp_url", type: "url", placeholder: "https://example.com/mcp", required: true,
                               id: "mcp-url" });
  const testOut = h("div", { id: "mcp-result" });
  const testForm = h("form", { class: "inline", id: "test-mcp" }, field("MCP URL", testUrl),
    h("button", { type: "submit" }, "Test"));
  const name = h("input", { name: "name", required: true });
  const url = h("input", { name: "mcp_url", type: "url", required: true });
  const desc = h("input", { name: "description" });
  const pub = h("input", { name: "is_public", type: "checkbox" });
  const addOut = h("div");
  const addForm = h("form", { class: "form-grid", id: "add-tool" }, field("Name", name), field("MCP URL", url),
    field("Description", desc), field("Public", pub), h("div", { class: "actions" }, h("button", { type: "submit" }, "Register")), addOut);
  const listOut = h("div", { id: "tools-table" });
  view.append(section("Test an MCP server", testForm, testOut), section("Register a tool", addForm),
              section("Tools", listOut));

  testForm.addEventListener("submit", async ev => {
    ev.preventDefault();
    fill(testOut, h("p", { class: "muted" }, "connecting…"));
    try {
      const r = await api("POST", "/tools/test-mcp", { body: { mcp_url: testUrl.value.trim() } });
      const ok = r.ok !== false && !r.error;
      fill(testOut, h("div", { class: ok ? "ok" : "error", dataset: { ok: String(ok) } },
        h("strong", {}, ok ? "Handshake OK" : "Handshake failed"), r.error ? `: ${r.error}` : "",
        r.server_info ? ` — ${r.server_info.name || ""} ${r.server_info.version || ""}` : "",
        r.latency_ms !== undefined ? ` (${r.latency_ms} ms)` : ""));
      if (Array.isArray(r.tools) && r.tools.length) {
        testOut.append(table([{ title: "Tool", cell: t => h("code", {}, t.name) },
                              { title: "Description", cell: t => t.description || "" }], r.tools));
      }
      testOut.append(h("details", {}, h("summary", {}, "Raw answer"), json(r)));
    } catch (err) { fill(testOut, errorBox(err)); }
  });

  async function load() {
    const data = await api("GET", "/tools", { query: { per_page: 100 } });
    fill(listOut, table([
      { title: "Name", cell: t => t.name, cls: "name" },
      { title: "URL", cell: t => h("code", {}, t.mcp_url) },
      { title: "Description", cell: t => t.description || "" },
      { title: "Public", cell: t => (t.is_public ? "yes" : "no") },
      { title: "Used", cell: t => String(t.usage_count), cls: "num" },
      { title: "Created", cell: t => fmtTime(t.created_at) },
      { title: "", cell: t => h("button", { class: "danger", onclick: async () => {
        try { await api("DELETE", `/tools/${t.id}`); toast("Tool deleted"); load(); } catch (err) { toast(err.message, "error"); }
      } }, "Delete") },
    ], data.items));
  }

  addForm.addEventListener("submit", async ev => {
    ev.preventDefault();
    clear(addOut);
    try {
      await api("POST", "/tools", { body: { name: name.value.trim(), mcp_url: url.value.trim(),
                                            description: desc.value.trim() || null, is_public: pub.checked } });
      toast("Tool registered");
      addForm.reset();
      await load();
    } catch (err) { addOut.append(errorBox(err)); }
  });
  await load();
}
