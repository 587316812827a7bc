// The triserve playground: the public HTTP API only (GET v1/models, POST v1/completions or
// v1/chat/completions with stream and decoding.trace), replaying the trace events as they arrive.
"use strict";

const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const $ = (id) => document.getElementById(id);
const models = {};
let queue = [];
let replaying = null;
let view = null;

function headers() {
  const key = $("api-key").value || localStorage.getItem("triserve-key") || "";
  if ($("api-key").value) localStorage.setItem("triserve-key", $("api-key").value);
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModels() {
  const select = $("model");
  select.innerHTML = "";
  const resp = await fetch(base + "v1/models", { headers: headers() });
  if (!resp.ok) {
    $("status").textContent = "models: HTTP " + resp.status + " (API key?)";
    return;
  }
  const body = await resp.json();
  for (const m of body.data) {
    models[m.id] = m;
    select.add(new Option(m.id + (m.triserve && m.triserve.vision ? " (vision)" : ""), m.id));
  }
  if (body.data.length > 1) select.add(new Option("auto (router picks the size)", "auto"));
  onModel();
}

function onModel() {
  const m = models[$("model").value];
  const vision = Boolean(m && m.triserve && m.triserve.vision);
  $("image").disabled = !vision;
  if (!vision) $("image").value = "";
}

function number(id) {
  const v = $(id).value;
  return v === "" ? null : Number(v);
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function request() {
  const decoding = { mode: $("mode").value, trace: true };
  if (number("block-length")) decoding.block_length = number("block-length");
  if (number("threshold") !== null) decoding.threshold = number("threshold");
  if (number("revise")) decoding.revise = { threshold: number("revise") };
  const common = {
    model: $("model").value,
    max_tokens: number("max-tokens") || 64,
    temperature: number("temperature") || 0,
    stream: true,
    stream_options: { include_usage: true },
    service_tier: $("tier").value,
    decoding: decoding,
  };
  const file = $("image").files[0];
  if (file) {
    const url = await readImage(file);
    const content = [{ type: "image_url", image_url: { url: url } }, { type: "text", text: $("prompt").value }];
    return ["v1/chat/completions", Object.assign(common, { messages: [{ role: "user", content: content }] })];
  }
  const body = Object.assign(common, { prompt: $("prompt").value });
  if ($("suffix").value) body.suffix = $("suffix").value;
  return ["v1/completions", body];
}

function resetView(body) {
  view = { text: "", candidates: {}, maskedShown: 0, filled: 0 };
  queue = [];
  $("view-prompt").textContent = body.prompt || "";
  $("view-suffix").textContent = body.suffix || "";
  $("view-text").textContent = "";
  $("block").innerHTML = "";
  $("candidates").innerHTML = "";
  $("api-text").textContent = "";
  $("stats").textContent = "";
  document.body.dataset.done = "false";
}

function cell(text, kind) {
  const span = document.createElement("span");
  span.className = "cell " + kind;
  if (text !== null) span.textContent = text;
  return span;
}

function blockCells(event) {
  // the active block after one forward: masked, just committed, re-masked and suffix slots
  const cells = [];
  if (event.kind === "denoise") {
    event.block.forEach((token, i) => {
      let kind = token === null ? "masked" : "done";
      if (event.committed.includes(i)) kind = "new";
      if (event.remasked.includes(i)) kind = "masked remasked";
      if (i >= event.output_slots && token !== null) kind = "suffix";
      cells.push(cell(token, kind));
    });
  } else if (event.kind === "verify") {
    event.draft.forEach((token, i) => cells.push(cell(token, i < event.accepted ? "accepted" : "rejected")));
  } else if (event.kind === "draft") {
    event.draft.forEach((token) => cells.push(cell(token, "new")));
  }
  return cells;
}

function show(event) {
  const masked = event.block ? event.block.filter((t) => t === null).length : 0;
  view.maskedShown = Math.max(view.maskedShown, masked);
  view.filled += event.committed ? event.committed.length : 0;
  document.body.dataset.maskedShown = String(view.maskedShown);
  document.body.dataset.filled = String(view.filled);
  if (event.candidate !== undefined && event.kind !== "chosen") {
    // infilling: one row per middle length tried
    let row = view.candidates[event.candidate];
    if (!row) {
      row = view.candidates[event.candidate] = { el: document.createElement("div"), text: "" };
      row.el.dataset.candidate = event.candidate;
      $("candidates").appendChild(row.el);
    }
    row.text += event.emitted;
    row.el.replaceChildren(document.createTextNode("length " + event.candidate + ": " + row.text), ...blockCells(event));
    return;
  }
  if (event.kind === "chosen") {
    const row = view.candidates[event.candidate];
    if (row) row.el.classList.add("chosen");
    view.text = event.text;
  } else {
    view.text += event.emitted;
  }
  $("view-text").textContent = view.text;
  $("block").replaceChildren(...blockCells(event));
}

function replay() {
  if (replaying) return;
  const step = () => {
    const event = queue.shift();
    if (event === undefined) {
      replaying = null;
      if (view.streamDone) finish();
      return;
    }
    show(event);
    replaying = setTimeout(step, number("delay") || 0);
  };
  replaying = setTimeout(step, 0);
}

function finish() {
  $("block").replaceChildren();
  document.body.dataset.done = "true";
  $("status").textContent = "done";
}

async function run() {
  const [path, body] = await request();
  resetView(body);
  $("status").textContent = "running";
  const resp = await fetch(base + path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!resp.ok) {
    const err = await resp.json().catch(() => ({}));
    $("status").textContent = "HTTP " + resp.status + ": " + ((err.error && err.error.message) || "");
    document.body.dataset.done = "true";
    return;
  }
  const mode = resp.headers.get("x-triserve-mode");
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  let apiText = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += decoder.decode(value, { stream: true });
    const parts = pending.split("\n\n");
    pending = parts.pop();
    for (const part of parts) {
      const data = part.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.triserve_trace) queue.push(chunk.triserve_trace);
      for (const choice of chunk.choices || []) {
        apiText += choice.text !== undefined ? choice.text : choice.delta.content || "";
      }
      if (chunk.triserve) {
        const t = chunk.triserve;
        $("stats").textContent = `model ${t.model} · mode ${t.mode}${t.block_length ? " @" + t.block_length : ""}` +
          `${t.explored ? " (explored)" : ""} · NFE ${t.nfe} · TPF ${t.tpf}`;
      } else if (mode && !$("stats").textContent) {
        $("stats").textContent = "mode " + mode;
      }
      replay();
    }
    $("api-text").textContent = apiText;
  }
  view.streamDone = true;
  if (!replaying) finish();
}

$("model").addEventListener("change", onModel);
$("run").addEventListener("click", () => run().catch((e) => { $("status").textContent = String(e); }));
$("api-key").value = localStorage.getItem("triserve-key") || "";
loadModels().catch((e) => { $("status").textContent = String(e); });
