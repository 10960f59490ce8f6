// New run: POST /runs from the caller's files, optionally prefilled from a shared configuration
// (#/new?config=<uuid>; another user's configuration is copied first, which copies its files to the caller).

import { api } from "../api.js";
import { clear, errorBox, field, fill, h, section, select } from "../dom.js";

async function fileOptions(type) {
  const data = await api("GET", "/files", { query: { type, per_page: 100 } });
  return data.items.map(f => [f.id, `${f.name} (${f.file_size_human})`]);
}

export async function render(view, { query }) {
  const [prompts, rewards, envs, sfts] = await Promise.all(
    ["prompt", "reward_function", "environment", "sft"].map(fileOptions));
  const out = h("div");
  const note = h("div");
  const model = h("input", { name: "model", value: "builtin:tiny", required: true });
  const type = select([["reward_function", "reward function"], ["environment", "environment"]], "reward_function",
                      { name: "type" });
  const prompt = select(prompts, prompts[0] && prompts[0][0], { name: "prompt_file_id" });
  const reward = h("select", { name: "reward_file_id" });
  const sft = select([["", "none"], ...sfts], "", { name: "sft_file_id" });
  const runName = h("input", { name: "run_name", placeholder: "optional" });
  const epochs = h("input", { name: "epochs", type: "number", min: 1, value: 1 });
  const length = h("input", { name: "completion_length", type: "number", min: 1, value: 256 });
  const maxSteps = h("input", { name: "max_steps", type: "number", min: 0, placeholder: "all" });
  const lr = h("input", { name: "learning_rate_multiplier", type: "number", step: "0.1", min: 0.1, value: 1 });
  const lora = h("input", { name: "use_lora", type: "checkbox" });
  const extra = h("textarea", { name: "extra", rows: 4, placeholder: '{"num_generations": 4}' });
  const fillRewards = (value) => {
    const opts = type.value === "environment" ? envs : rewards;
    fill(reward, ...opts.map(([v, t]) => h("option", { value: v, selected: v === value }, t)));
  };
  type.addEventListener("change", () => fillRewards());
  fillRewards();

  function prefill(cfg, ids) {
    const c = cfg || {};
    if (c.model) model.value = c.model;
    const mode = c.type || c.reward_mode;
    if (mode === "environment" || mode === "reward_function") type.value = mode;
    for (const [input, key] of [[epochs, "epochs"], [length, "completion_length"], [maxSteps, "max_steps"],
                                [lr, "learning_rate_multiplier"]]) if (c[key] !== undefined) input.value = c[key];
    if (c.use_lora !== undefined) lora.checked = !!c.use_lora;
    const known = new Set(["model", "type", "reward_mode", "epochs", "completion_length", "max_steps",
                           "learning_rate_multiplier", "use_lora"]);
    const rest = Object.fromEntries(Object.entries(c).filter(([k]) => !known.has(k)));
    if (Object.keys(rest).length) extra.value = JSON.stringify(rest, null, 2);
    const ensure = (sel, id) => {
      if (!id) return;
      if (![...sel.options].some(o => o.value === id)) sel.append(h("option", { value: id }, id));
      sel.value = id;
    };
    ensure(prompt, ids.prompt_file_id);
    fillRewards(ids.reward_file_id);
    ensure(reward, ids.reward_file_id);
    ensure(sft, ids.sft_file_id);
  }

  const configId = query.get("config");
  if (configId) {
    try {
      const shared = await api("GET", `/shared-configurations/${encodeURIComponent(configId)}`);
      if (shared.is_owner) {
        prefill(shared.configuration, shared);
        note.append(h("p", { class: "muted" }, "From your configuration ", h("strong", {}, shared.name), "."));
      } else {
        note.append(h("p", {}, "Configuration ", h("strong", {}, shared.name), " by ",
          (shared.creator && shared.creator.name) || "another user", ". ",
          h("button", { type: "button", id: "copy-config", onclick: async ev => {
            ev.currentTarget.disabled = true;
            try {
              const copy = await api("POST", `/shared-configurations/${encodeURIComponent(configId)}/copy`);
              prefill(copy.configuration, copy);
              fill(note, h("p", { class: "muted" }, "Copied: its files are now yours."));
            } catch (err) { note.append(errorBox(err)); }
          } }, "Copy it and its files to my account")));
        prefill(shared.configuration, {});
      }
    } catch (err) { note.append(errorBox(err)); }
  }

  const form = h("form", { id: "new-run", class: "form-grid" },
    field("Model", model, "a Hugging Face id (org/name) or builtin:NAME"), field("Type", type),
    field("Prompt file", prompt), field("Reward / environment file", reward), field("SFT file", sft),
    field("Run name", runName), field("Epochs", epochs), field("Completion length", length),
    field("Max steps", maxSteps), field("Learning-rate multiplier", lr), field("LoRA", lora),
    field("More parameters (JSON)", extra, "any engine key, e.g. num_generations, max_steps"),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Start run")), out);
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    clear(out);
    let body;
    try {
      body = extra.value.trim() ? JSON.parse(extra.value) : {};
      if (typeof body !== "object" || Array.isArray(body) || body === null) throw new Error("must be a JSON object");
    } catch (err) {
      out.append(errorBox({ message: `More parameters: ${err.message}` }));
      return;
    }
    Object.assign(body, { model: model.value.trim(), type: type.value, prompt_file_id: prompt.value,
                          reward_file_id: reward.value, epochs: Number(epochs.value),
                          completion_length: Number(length.value), learning_rate_multiplier: Number(lr.value),
                          use_lora: lora.checked });
    if (sft.value) body.sft_file_id = sft.value;
    if (runName.value.trim()) body.run_name = runName.value.trim();
    if (maxSteps.value) body.max_steps = Number(maxSteps.value);
    try {
      const created = await api("POST", "/runs", { body });
      location.hash = `#/runs/${created.id}`;
    } catch (err) { out.append(errorBox(err)); }
  });
  view.append(section("New run", note, form));
}
