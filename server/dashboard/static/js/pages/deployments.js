// Deployments: the list (GET /deployments), and one deployment: its status (polled while pending), delete, and a
// chat box that streams from its OpenAI-compatible endpoint (`{api_url}/v1/chat/completions` with stream: true,
// read as Server-Sent Events through fetch). The request goes to this origin's path of that endpoint, so the
// page's connect-src 'self' holds even when the server advertises another public URL.

import { api, poll, sse } from "../api.js";
import { clear, errorBox, field, fill, fmtTime, h, section, table, toast } from "../dom.js";

export async function renderList(view) {
  const data = await api("GET", "/deployments", { query: { per_page: 100 } });
  view.append(section("Deployments", table([
    { title: "ID", cell: d => h("a", { href: `#/deployments/${d.id}` }, `#${d.id}`) },
    { title: "Status", cell: d => h("span", { class: `badge dep-${d.status}` }, d.status) },
    { title: "Run", cell: d => h("a", { href: `#/runs/${d.run_id}` }, `#${d.run_id}`) },
    { title: "Base model", cell: d => h("code", {}, d.base_model) },
    { title: "Endpoint", cell: d => d.api_url ? h("code", {}, `${d.api_url}/v1/chat/completions`) : "—" },
    { title: "Created", cell: d => fmtTime(d.created_at) },
  ], data.items), h("p", { class: "muted" }, "Deploy a completed run from its page.")));
}

export async function render(view, { params }) {
  const id = Number(params[0]);
  const head = h("section", { class: "card", id: "deployment-head" });
  const log = h("div", { class: "chat-log", id: "chat-log", "aria-live": "polite" });
  const input = h("textarea", { id: "chat-input", rows: 2, placeholder: "Say something…", required: true });
  const maxTokens = h("input", { type: "number", min: 1, max: 4096, value: 64, id: "max-tokens" });
  const temperature = h("input", { type: "number", min: 0, max: 2, step: "0.1", value: 0.7, id: "temperature" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stopBtn = h("button", { type: "button", class: "secondary", hidden: true }, "Stop");
  const chatOut = h("div");
  const form = h("form", { class: "chat-form", id: "chat" }, input,
    h("div", { class: "chat-controls" }, field("Max tokens", maxTokens), field("Temperature", temperature),
      send, stopBtn, h("button", { type: "button", class: "secondary", onclick: () => { messages.length = 0; clear(log); } }, "Clear")),
    chatOut);
  view.append(head, section("Chat", log, form));
  const messages = [];
  let dep = null;
  let abort = null;

  function renderHead() {
    fill(head, 
      h("div", { class: "toolbar" }, h("h1", {}, `Deployment #${dep.id}`),
        h("span", { class: `badge dep-${dep.status}`, id: "deployment-status", dataset: { status: dep.status } }, dep.status),
        h("span", { class: "spacer" }),
        dep.status !== "deleted" ? h("button", { class: "danger", onclick: remove }, "Delete deployment") : null),
      h("dl", { class: "meta" },
        h("div", {}, h("dt", {}, "Run"), h("dd", {}, h("a", { href: `#/runs/${dep.run_id}` }, `#${dep.run_id}`))),
        h("div", {}, h("dt", {}, "Base model"), h("dd", {}, h("code", {}, dep.base_model))),
        h("div", { class: "wide" }, h("dt", {}, "Endpoint"),
          h("dd", {}, dep.api_url ? h("code", {}, `${dep.api_url}/v1/chat/completions`) : "not serving")),
        h("div", {}, h("dt", {}, "Created"), h("dd", {}, fmtTime(dep.created_at)))),
      dep.error_message ? h("pre", { class: "error-text" }, dep.error_message) : null);
    send.disabled = dep.status !== "active";
  }

  async function remove() {
    if (!confirm(`Delete deployment ${dep.id}? Its model server stops.`)) return;
    try { dep = await api("DELETE", `/deployments/${id}`); toast("Deployment deleted"); renderHead(); }
    catch (err) { toast(err.message, "error"); }
  }

  function bubble(role, content) {
    const body = h("div", { class: "content" }, content);
    const el = h("div", { class: `bubble ${role}`, dataset: { role } }, h("div", { class: "role" }, role), body);
    log.append(el);
    log.scrollTop = log.scrollHeight;
    return body;
  }

  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || send.disabled) return;
    clear(chatOut);
    input.value = "";
    messages.push({ role: "user", content: text });
    bubble("user", text);
    const out = bubble("assistant", "");
    out.parentElement.dataset.streaming = "true";
    let reply = "", chunks = 0;
    abort = new AbortController();
    send.disabled = true;
    stopBtn.hidden = false;
    try {
      await sse(`/deployments/${id}/v1/chat/completions`, {
        method: "POST", signal: abort.signal,
        body: { messages, stream: true, max_tokens: Number(maxTokens.value) || 64, temperature: Number(temperature.value) },
        onEvent: e => {
          if (e.data === "[DONE]") return;
          let chunk;
          try { chunk = JSON.parse(e.data); } catch (err) { return; }
          if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            reply += delta.content;
            out.textContent = reply;
            out.parentElement.dataset.chunks = String(++chunks);
            log.scrollTop = log.scrollHeight;
          }
        } });
      messages.push({ role: "assistant", content: reply });
    } catch (err) {
      if (err.name !== "AbortError") chatOut.append(errorBox(err));
      else if (reply) messages.push({ role: "assistant", content: reply });
    } finally {
      out.parentElement.dataset.streaming = "false";
      if (!reply) out.textContent = "(no answer)";
      abort = null;
      stopBtn.hidden = true;
      send.disabled = !dep || dep.status !== "active";
    }
  });
  stopBtn.addEventListener("click", () => abort && abort.abort());
  input.addEventListener("keydown", ev => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
  });

  const refresh = async () => {
    dep = await api("GET", `/deployments/${id}`);
    renderHead();
    return dep.status === "pending";
  };
  send.disabled = true;
  try {
    await refresh();
  } catch (err) {
    fill(head, errorBox(err));
    return null;
  }
  const stop = dep.status === "pending" ? poll(refresh, 1500, false) : () => {};
  return () => { stop(); if (abort) abort.abort(); };
}
