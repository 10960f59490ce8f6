// Files: upload (POST /files, multipart) followed by its validation (POST /validation/prompt-file, /sft-file or
// /reward-function), the list with type filter, a preview (GET /files/{id}/preview), validate again, download, delete.

import { api, download } from "../api.js";
import { clear, errorBox, field, fill, fmtTime, h, json, section, select, table, toast } from "../dom.js";

const TYPES = [["prompt", "prompt (JSONL)"], ["reward_function", "reward function (Python)"],
               ["environment", "environment (Python)"], ["sft", "SFT (JSONL)"]];

// Validation feedback for a file: {valid, error, errors, details}.
function report(result) {
  const ok = !!result.valid;
  const box = h("div", { class: ok ? "ok" : "error", id: "validation", dataset: { valid: String(ok) } },
    h("strong", {}, ok ? "Valid" : "Not valid"), result.error ? `: ${result.error}` : "");
  const d = result.details || {};
  const counts = ["total_lines", "valid_lines", "rows", "samples"].filter(k => typeof d[k] === "number")
    .map(k => `${k.replace("_", " ")}: ${d[k]}`);
  if (counts.length) box.append(h("span", { class: "muted" }, ` (${counts.join(", ")})`));
  const errors = (result.errors || []).slice(result.error ? 1 : 0);
  if (errors.length) box.append(h("ul", {}, errors.map(e => h("li", {}, String(e)))));
  if (Array.isArray(result.warnings) && result.warnings.length) {
    box.append(h("ul", { class: "warnings" }, result.warnings.map(w => h("li", {}, `warning: ${w}`))));
  }
  if (result.details) box.append(h("details", {}, h("summary", {}, "Details"), json(result.details)));
  return box;
}

async function validate(file, promptFileId) {
  if (file.type === "prompt") return api("POST", "/validation/prompt-file", { body: { prompt_file_id: file.id } });
  if (file.type === "sft") return api("POST", "/validation/sft-file", { body: { sft_file_id: file.id } });
  const { content } = await api("GET", `/files/${file.id}/content`);
  const body = { functionCode: content, mode: file.type === "environment" ? "environment" : "function" };
  if (promptFileId) body.prompt_file_id = promptFileId;
  return api("POST", "/validation/reward-function", { body });
}

function preview(data) {
  const rows = data.lines.map((line, i) => h("li", {}, typeof line === "string" ? h("code", {}, line)
    : h("pre", { class: "json" }, JSON.stringify(line))));
  return h("div", { id: "preview" },
    h("p", { class: "muted" }, `${data.preview_lines} of ${data.total_lines} lines${data.truncated ? " (truncated)" : ""}`),
    data.type === "prompt" || data.type === "sft" ? h("ol", { class: "preview" }, rows) : h("pre", { class: "code" }, data.content));
}

export async function render(view) {
  const fileInput = h("input", { type: "file", name: "file", required: true, id: "upload-file" });
  const typeSel = select(TYPES, "prompt", { name: "type", id: "upload-type" });
  const nameInput = h("input", { name: "name", placeholder: "defaults to the file's name", id: "upload-name" });
  const promptFor = h("select", { name: "prompt_file_id", id: "validate-with" });
  const uploadOut = h("div", { id: "upload-result" });
  const listOut = h("div", { id: "files-table" });
  const detail = h("div", { id: "file-detail" });
  const filter = select([["", "All types"], ...TYPES], "", { id: "files-filter", "aria-label": "Type" });

  const form = h("form", { class: "form-grid", id: "upload" },
    field("File", fileInput), field("Type", typeSel), field("Name", nameInput),
    field("Check code against prompts", promptFor, "reward/environment code runs in the sandbox on up to 3 rows"),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Upload and validate")));
  view.append(section("Upload a file", form, uploadOut),
    h("section", { class: "card" }, h("div", { class: "toolbar" }, h("h1", {}, "Files"), filter), listOut, detail));

  async function refreshPromptChoices() {
    const prompts = await api("GET", "/files", { query: { type: "prompt", per_page: 100 } });
    const current = promptFor.value;
    fill(promptFor, h("option", { value: "" }, "no prompt file"),
      ...prompts.items.map(f => h("option", { value: f.id, selected: f.id === current }, f.name)));
  }

  async function load() {
    const data = await api("GET", "/files", { query: { type: filter.value, per_page: 100 } });
    fill(listOut, table([
      { title: "Name", cell: f => f.name, cls: "name" },
      { title: "Type", cell: f => f.type },
      { title: "Size", cell: f => f.file_size_human, cls: "num" },
      { title: "Created", cell: f => fmtTime(f.created_at) },
      { title: "", cell: f => h("span", { class: "actions" },
        h("button", { class: "secondary", onclick: () => showPreview(f) }, "Preview"),
        h("button", { class: "secondary", onclick: () => revalidate(f) }, "Validate"),
        h("button", { class: "secondary", onclick: () => download(`/files/${f.id}/download`, f.original_filename || f.name)
          .catch(err => toast(err.message, "error")) }, "Download"),
        h("button", { class: "danger", onclick: () => remove(f) }, "Delete")) },
    ], data.items, f => ({ dataset: { fileId: f.id } })));
  }

  async function showPreview(f) {
    fill(detail, h("h2", {}, `Preview: `, f.name));
    try { detail.append(preview(await api("GET", `/files/${f.id}/preview`, { query: { lines: 20 } }))); }
    catch (err) { detail.append(errorBox(err)); }
  }

  async function revalidate(f) {
    fill(detail, h("h2", {}, "Validation: ", f.name), h("p", { class: "muted" }, "checking…"));
    try { detail.lastChild.replaceWith(report(await validate(f, promptFor.value))); }
    catch (err) { detail.lastChild.replaceWith(errorBox(err)); }
  }

  async function remove(f) {
    if (!confirm(`Delete ${f.name}?`)) return;
    try { await api("DELETE", `/files/${f.id}`); toast("File deleted"); await load(); await refreshPromptChoices(); }
    catch (err) { fill(detail, errorBox(err)); }
  }

  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    clear(uploadOut);
    const file = fileInput.files[0];
    if (!file) return;
    const body = new FormData();
    body.append("file", file);
    body.append("type", typeSel.value);
    if (nameInput.value.trim()) body.append("name", nameInput.value.trim());
    let created;
    try {
      created = await api("POST", "/files", { form: body });
    } catch (err) { uploadOut.append(errorBox(err)); return; }
    const state = h("span", {}, "Validating…");
    uploadOut.append(h("p", {}, "Uploaded ", h("strong", { class: "name" }, created.name), ` (${created.file_size_human}, id `,
      h("code", {}, created.id), "). ", state));
    load();
    try { uploadOut.append(report(await validate(created, promptFor.value))); }
    catch (err) { uploadOut.append(errorBox(err)); }
    state.textContent = "Validation:";
    refreshPromptChoices();
    showPreview(created);
  });
  filter.addEventListener("change", () => load().catch(err => fill(listOut, errorBox(err))));
  await Promise.all([load(), refreshPromptChoices()]);
}
