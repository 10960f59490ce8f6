// The REST API from the browser: the key (sessionStorage of this tab only: gone when the tab closes), JSON calls
// that unwrap the envelope, and Server-Sent Events read with fetch() (EventSource cannot send the Authorization
// header the API needs).

const KEY = "runrl.apiKey";
export const API = new URL("../../api/v1/", import.meta.url);  // static/js/ -> the app root

export class ApiError extends Error {
  constructor(status, message, details, code) {
    super(message);
    this.status = status;
    this.details = details;
    this.code = code;
  }
}

export function getKey() { return sessionStorage.getItem(KEY); }
export function setKey(key) { sessionStorage.setItem(KEY, key); }
export function clearKey() { sessionStorage.removeItem(KEY); }

export function url(path, query) {
  const u = new URL(path.replace(/^\//, ""), API);
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null && v !== "") u.searchParams.set(k, v);
  return u;
}

function headers(extra = {}, key = getKey()) {
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function failure(resp) {
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (resp.status === 401) window.dispatchEvent(new CustomEvent("runrl:unauthorized"));
  return new ApiError(resp.status, (body && body.message) || `${resp.status} ${resp.statusText}`,
    body && body.details, body && body.error);
}

// `api("GET", "/runs", {query})` -> the envelope's `data`; a failure throws ApiError with its message and details.
export async function api(method, path, { body, query, form, key, signal } = {}) {
  const init = { method, headers: headers({}, key), signal };
  if (form) init.body = form;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(url(path, query), init);
  if (!resp.ok) throw await failure(resp);
  const envelope = await resp.json();
  return envelope.data;
}

// A binary download (the Authorization header rules out a plain link): fetched, then saved from a blob URL.
export async function download(path, filename) {
  const resp = await fetch(url(path), { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  const blob = await resp.blob();
  const href = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10000);
}

// Reads an SSE response: calls onEvent({event, data}) per event; resolves when the stream ends or `signal` aborts.
export async function sse(path, { method = "GET", body, signal, onEvent, base } = {}) {
  const init = { method, headers: headers({ Accept: "text/event-stream" }), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(base ? new URL(path, base) : url(path), init);
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (name === "event") event = val;
          else if (name === "data") data.push(val);
        }
        if (data.length) onEvent({ event, data: data.join("\n") });
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// Calls fn now and then every `ms` while the tab is visible (a hidden tab spends none of the key's quota);
// returns a stop function. fn may return false to stop; `immediate` false waits `ms` before the first call.
export function poll(fn, ms, immediate = true) {
  let timer = null, stopped = false;
  const tick = async () => {
    if (stopped) return;
    let again = true;
    if (!document.hidden) {
      try { again = (await fn()) !== false; } catch (e) { console.warn(e); }
    }
    if (!stopped && again) timer = setTimeout(tick, ms);
  };
  if (immediate) tick(); else timer = setTimeout(tick, ms);
  return () => { stopped = true; clearTimeout(timer); };
}
