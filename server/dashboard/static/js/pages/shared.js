// Shared configurations: the caller's own (GET /shared-configurations), public and unlisted ones (GET .../browse),
// share a new one from one's files (POST), like, copy, delete, and start a run from one (#/new?config=<uuid>).

import { api } from "../api.js";
import { clear, errorBox, field, fill, fmtTime, h, section, select, table, toast } from "../dom.js";

async function fileChoices(type) {
  const data = await api("GET", "/files", { query: { type, per_page: 100 } });
  return data.items.map(f => [f.id, f.name]);
}

export async function render(view) {
  const [prompts, rewards, envs] = await Promise.all(["prompt", "reward_function", "environment"].map(fileChoices));
  const name = h("input", { name: "name", required: true });
  const desc = h("input", { name: "description" });
  const visibility = select(["private", "unlisted", "public"], "private", { name: "visibility" });
  const prompt = select(prompts, prompts[0] && prompts[0][0], { name: "prompt_file_id" });
  const reward = select([...rewards, ...envs], (rewards[0] || envs[0] || [])[0], { name: "reward_file_id" });
  const config = h("textarea", { name: "configuration", rows: 4 },
    JSON.stringify({ model: "builtin:tiny", type: "reward_function", epochs: 1 }, null, 2));
  const out = h("div");
  const form = h("form", { class: "form-grid", id: "share" }, field("Name", name), field("Description", desc),
    field("Visibility", visibility), field("Prompt file", prompt), field("Reward / environment file", reward),
    field("Configuration (JSON)", config), h("div", { class: "actions" }, h("button", { type: "submit" }, "Share")), out);
  const mine = h("div", { id: "shared-mine" });
  const browse = h("div", { id: "shared-browse" });
  view.append(section("My configurations", mine), section("Browse public and unlisted configurations", browse),
              section("Share a configuration", form));

  const columns = own => [
    { title: "Name", cell: c => c.name, cls: "name" },
    { title: "Description", cell: c => c.description || "" },
    { title: "Model", cell: c => h("code", {}, (c.configuration && c.configuration.model) || "") },
    { title: "Visibility", cell: c => c.visibility },
    { title: "By", cell: c => (c.creator && c.creator.name) || "" },
    { title: "Likes", cell: c => String(c.stats ? c.stats.likes : 0), cls: "num" },
    { title: "Copies", cell: c => String(c.stats ? c.stats.copies : 0), cls: "num" },
    { title: "Updated", cell: c => fmtTime(c.updated_at) },
    { title: "", cell: c => h("span", { class: "actions" },
      h("a", { class: "button", href: `#/new?config=${encodeURIComponent(c.uuid)}` }, "Start run"),
      h("button", { class: "secondary", onclick: () => act("POST", `/shared-configurations/${c.uuid}/like`, c.liked ? "Unliked" : "Liked") },
        c.liked ? "Unlike" : "Like"),
      own ? null : h("button", { class: "secondary", onclick: () => act("POST", `/shared-configurations/${c.uuid}/copy`, "Copied to your account") }, "Copy"),
      own ? h("button", { class: "danger", onclick: () => act("DELETE", `/shared-configurations/${c.uuid}`, "Deleted") }, "Delete") : null) },
  ];

  async function act(method, path, done) {
    try { await api(method, path); toast(done); await load(); } catch (err) { toast(err.message, "error"); }
  }

  async function load() {
    const [own, pub] = await Promise.all([api("GET", "/shared-configurations", { query: { per_page: 100 } }),
                                          api("GET", "/shared-configurations/browse", { query: { per_page: 50 } })]);
    fill(mine, table(columns(true), Array.isArray(own) ? own : own.items));
    fill(browse, table(columns(false), pub.items.filter(c => !c.is_owner)));
  }

  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    clear(out);
    let configuration;
    try { configuration = JSON.parse(config.value || "{}"); } catch (err) { out.append(errorBox({ message: `Configuration: ${err.message}` })); return; }
    try {
      await api("POST", "/shared-configurations", { body: { name: name.value.trim(), description: desc.value.trim() || null,
        visibility: visibility.value, prompt_file_id: prompt.value || null, reward_file_id: reward.value || null, configuration } });
      toast("Configuration shared");
      await load();
    } catch (err) { out.append(errorBox(err)); }
  });
  await load();
}
