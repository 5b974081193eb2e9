// The llamafleet dashboard: plain ES module, no build step, no third-party code.
const $ = (id) => document.getElementById(id);
const COLORS = ["#1565c0", "#6a1b9a", "#00838f", "#ad1457", "#558b2f", "#4e342e", "#283593", "#00695c"];
const state = { nodes: [], models: [], pulls: [], colors: new Map(), lastEvent: 0 };
// Pulls that ended stay on the page this long (the event log keeps them for good).
const ENDED_PULL_SHOWN_MS = 10 * 60 * 1000;

function key() { return localStorage.getItem("llamafleet.key") || ""; }

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (key()) headers.Authorization = `Bearer ${key()}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 || response.status === 403) {
    // The nodes, models, logs and events are control routes: they need the admin key, which
    // also opens the prompt form (an API key alone opens only that).
    $("key-form").hidden = false;
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || "the controller asks for the admin key");
  }
  return response;
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function colorOf(model) {
  if (!state.colors.has(model)) state.colors.set(model, COLORS[state.colors.size % COLORS.length]);
  return state.colors.get(model);
}

function badge(text) { return el("span", { class: `badge state-${text}` }, text); }

function renderNodes() {
  const cards = state.nodes.map((node) => {
    const rpc = node.rpc_server || {};
    const card = el("div", { class: "card", "data-node": node.address, "data-state": node.state },
      el("h3", {}, el("span", {}, node.address), badge(node.state)),
      el("div", { class: "legend" },
        `rpc-server ${rpc.state || "?"} ${rpc.endpoint || ""} · restarts ${rpc.restarts ?? 0}` +
        (rpc.model ? ` · serving ${rpc.model}` : "") +
        (node.error && node.state !== "ready" ? ` · ${node.error}` : "")));
    // One model per rpc-server: the node's other rpc-servers, and whom they serve.
    for (const other of (node.rpc_servers || []).slice(1)) {
      if (other.state === "stopped" && !other.model) continue;
      card.append(el("div", { class: "legend", "data-rpc-endpoint": other.endpoint },
        `rpc-server #${other.index} ${other.state} ${other.endpoint}` + (other.model ? ` · serving ${other.model}` : "")));
    }
    // The model files the node holds: a placement prefers it for those, and loads them from its disk.
    const held = (node.models || []).filter((m) => m.state === "ready");
    if (held.length) {
      card.append(el("div", { class: "legend", "data-holds": held.map((m) => m.name).join(" ") },
        `holds ${held.map((m) => `${m.name} (${size(Number(m.size_bytes))})`).join(", ")}`));
    }
    for (const device of node.devices || []) {
      const used = state.models.flatMap((m) => (m.assignments || [])
        .filter((a) => a.node === node.address && a.device === device.name)
        .map((a) => ({ model: m.model, bytes: a.total_bytes })));
      const ours = used.reduce((sum, u) => sum + u.bytes, 0);
      const other = Math.max(device.total_bytes - device.free_bytes - ours, 0);
      const bar = el("div", { class: "bar", title: `${device.name}` });
      for (const u of used) {
        bar.append(el("span", { style: "", title: `${u.model}: ${size(u.bytes)}` }));
        bar.lastChild.style.width = `${(100 * u.bytes) / device.total_bytes}%`;
        bar.lastChild.style.background = colorOf(u.model);
      }
      if (other > 0) {
        bar.append(el("span", { class: "seg-other", title: `other: ${size(other)}` }));
        bar.lastChild.style.width = `${(100 * other) / device.total_bytes}%`;
      }
      const free = Math.max(device.total_bytes - ours - other, 0);
      card.append(el("div", { class: "legend" }, `${device.name}: ${size(free)} free of ${size(device.total_bytes)}` +
        (used.length ? ` · ${used.map((u) => `${u.model} ${size(u.bytes)}`).join(", ")}` : "")), bar);
    }
    return card;
  });
  $("nodes").replaceChildren(...(cards.length ? cards : [el("p", {}, "no nodes: add one with `llamafleet node add`")]));
}

function renderModels() {
  const rows = state.models.map((m) => {
    const total = (m.assignments || []).reduce((sum, a) => sum + a.layer_count + (a.output ? 1 : 0), 0) || 1;
    const strip = el("div", { class: "layers" });
    for (const a of m.assignments || []) {
      const last = a.first_layer + a.layer_count - 1;
      const label = `${a.endpoint} ${a.device}: layers ${a.first_layer}-${last}${a.output ? " + output" : ""}`;
      const part = el("span", { title: label, "data-endpoint": a.endpoint }, label);
      part.style.width = `${(100 * (a.layer_count + (a.output ? 1 : 0))) / total}%`;
      part.style.background = colorOf(m.model);
      strip.append(part);
    }
    const stop = el("button", { onclick: () => json("/llamafleet/v1/stop", { method: "POST",
      body: JSON.stringify({ model: m.model }) }).then(refresh).catch(showError) }, "stop");
    return el("div", { class: "card", "data-model": m.model, "data-state": m.state },
      el("h3", {}, el("span", {}, m.model), badge(m.state)),
      el("div", { class: "legend" }, `${size(m.size_bytes)} over ${m.backends.length} backend(s) · split ` +
        `${m.tensor_split.join(",")} · context ${m.ctx} · ${m.parallel ?? 1} slot(s) · ` +
        `${m.in_flight} in flight, ${m.queued ?? 0} queued · restarts ${m.restarts}` +
        (m.detail ? ` · ${m.detail}` : "")), strip, stop);
  });
  $("models").replaceChildren(...(rows.length ? rows : [el("p", {}, "no models loaded: run a prompt to load one")]));
}

function renderPulls() {
  const shown = state.pulls.filter((p) => !["done", "failed"].includes(p.state) ||
    Date.now() - p.started_unix_ms < ENDED_PULL_SHOWN_MS);
  const cards = shown.map((pull) => {
    const card = el("div", { class: "card", "data-pull": pull.model, "data-state": pull.state },
      el("h3", {}, el("span", {}, pull.model), badge(pull.state)),
      el("div", { class: "legend" }, `${size(pull.total)}` + (pull.sha256 ? ` · sha256 ${pull.sha256.slice(0, 12)}` : "") +
        (pull.note ? ` · ${pull.note}` : "")));
    for (const part of pull.nodes) {
      const percent = part.total ? Math.floor((100 * part.completed) / part.total) : 100;
      const bar = el("div", { class: "bar", title: `${part.node}: ${percent}%` },
        el("span", { class: "seg-pulled" }));
      bar.lastChild.style.width = `${percent}%`;
      card.append(el("div", { class: "legend", "data-pull-node": part.node, "data-state": part.status },
        `${part.node} → ${part.name}: ${part.status} ${percent}% (${size(part.completed)} of ${size(part.total)})` +
        (part.resumed_from ? ` · resumed at ${size(part.resumed_from)}` : "") +
        (part.error ? ` · ${part.error}` : "")), bar);
    }
    return card;
  });
  $("pulls").replaceChildren(...(cards.length ? cards : [el("p", {}, "no pulls: `llamafleet pull MODEL` copies a model into the nodes' models dirs")]));
}

function renderLogSources() {
  const select = $("log-source");
  const chosen = select.value;
  const options = [
    ...state.models.map((m) => el("option", { value: `model:${m.model}` }, `coordinator ${m.model}`)),
    ...state.nodes.map((n) => el("option", { value: `node:${n.address}` }, `rpc-server on ${n.address}`)),
  ];
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

async function refreshLog() {
  const source = $("log-source").value;
  if (!source) return;
  const [kind, name] = [source.slice(0, source.indexOf(":")), source.slice(source.indexOf(":") + 1)];
  if (kind === "model") {
    const doc = await json(`/llamafleet/v1/logs/${encodeURIComponent(name)}?lines=200`);
    $("log").textContent = doc.lines.join("\n");
  } else {
    const node = state.nodes.find((n) => n.address === name);
    const rpc = (node && node.rpc_server) || {};
    const lines = [...(rpc.recent_output || []), ...(rpc.last_exit ? [`last exit: ${rpc.last_exit}`, ...(rpc.last_output || [])] : [])];
    $("log").textContent = lines.join("\n") || "(no output reported)";
  }
}

function showError(error) { $("summary").replaceChildren(el("span", { class: "error" }, String(error.message || error))); }

async function refresh() {
  try {
    [state.nodes, state.models, state.pulls] = await Promise.all([json("/llamafleet/v1/nodes"),
      json("/llamafleet/v1/ps"), json("/llamafleet/v1/pulls")]);
    const ready = state.nodes.filter((n) => n.state === "ready").length;
    $("summary").textContent = `${ready} of ${state.nodes.length} node(s) ready · ${state.models.length} model(s) loaded`;
    renderNodes();
    renderModels();
    renderPulls();
    renderLogSources();
    await refreshLog();
  } catch (error) { showError(error); }
}

async function loadModelList() {
  const tags = await json("/api/tags");
  $("prompt-model").replaceChildren(...tags.models.map((m) => el("option", { value: m.name }, m.name)));
}

function addEvent(event) {
  state.lastEvent = Math.max(state.lastEvent, event.id);
  const item = el("li", { "data-kind": event.kind },
    el("time", {}, new Date(event.at_ms).toLocaleTimeString()), el("span", { class: "kind" }, event.kind),
    `${event.subject}: ${event.message}`);
  $("events").prepend(item);
  while ($("events").children.length > 300) $("events").lastChild.remove();
  if (["node.", "coordinator.", "rpc.", "pull"].some((prefix) => event.kind.startsWith(prefix))) refresh();
}

async function readSeparated(response, separator, onItem) {
  // Calls onItem for every complete piece of a streamed body, as it arrives.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf(separator)) >= 0) {
      const item = buffer.slice(0, end);
      buffer = buffer.slice(end + separator.length);
      onItem(item);
    }
  }
}

async function followEvents() {
  // fetch, not EventSource: it can send the admin key.
  for (;;) {
    try {
      const response = await api(`/llamafleet/v1/events/stream?after=${state.lastEvent}`);
      $("live").textContent = "live";
      $("live").className = "badge live";
      await readSeparated(response, "\n\n", (block) => {
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) addEvent(JSON.parse(data));
      });
    } catch (error) { showError(error); }
    $("live").textContent = "offline";
    $("live").className = "badge";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function runPrompt(event) {
  event.preventDefault();
  $("answer").textContent = "";
  $("answer-stats").textContent = "loading…";
  $("prompt-run").disabled = true;
  try {
    const response = await api("/api/generate", { method: "POST", body: JSON.stringify({
      model: $("prompt-model").value, prompt: $("prompt").value,
      options: { num_predict: Number($("prompt-tokens").value) } }) });
    if (!response.ok) throw new Error((await response.json()).error);
    await readSeparated(response, "\n", (line) => {
      const doc = JSON.parse(line);
      if (doc.error) throw new Error(doc.error);
      $("answer").textContent += doc.response || "";
      if (doc.done) {
        const rate = doc.eval_count / (doc.eval_duration / 1e9);
        $("answer-stats").textContent = `${doc.eval_count} tokens · ${rate.toFixed(1)} tokens/s · ` +
          `load ${(doc.load_duration / 1e9).toFixed(1)} s · ${doc.done_reason}`;
      }
    });
  } catch (error) {
    $("answer-stats").replaceChildren(el("span", { class: "error" }, String(error.message || error)));
  } finally {
    $("prompt-run").disabled = false;
    refresh();
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("llamafleet.key", $("key").value);
  $("key-form").hidden = true;
  start();
});
$("prompt-form").addEventListener("submit", runPrompt);
$("log-source").addEventListener("change", () => refreshLog().catch(showError));

let started = false;
async function start() {
  await refresh();
  await loadModelList().catch(showError);
  if (!started) {
    started = true;
    followEvents();
    setInterval(refresh, 2000);
  }
}
start();
