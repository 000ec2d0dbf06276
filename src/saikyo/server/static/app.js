// The demo page: list the server's models, classify each picked or dropped image with POST /classify.
"use strict";

const TOP_K = 5;
const $ = (id) => document.getElementById(id);
const modelSelect = $("model");
const modelNote = $("model-note");
const drop = $("drop");
const input = $("files");
const results = $("results");
const statusLine = $("status");
const modelInfo = new Map(); // name -> metadata parameters (weights, backend, ...)

// Relative URLs: the page keeps working when the server sits behind a path prefix.
const api = (path) => new URL(path, document.baseURI);

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModels() {
  try {
    const response = await fetch(api("v2/models"));
    if (!response.ok) throw new Error(await errorText(response));
    const index = await response.json();
    modelSelect.replaceChildren();
    for (const entry of index) {
      const option = new Option(entry.state === "READY" ? entry.name : `${entry.name} (${entry.state.toLowerCase()})`, entry.name);
      option.disabled = entry.state !== "READY";
      modelSelect.append(option);
    }
    const firstReady = index.find((e) => e.state === "READY");
    if (firstReady) modelSelect.value = firstReady.name;
    statusLine.textContent = firstReady ? "" : "No model is ready yet; reload in a moment.";
    await Promise.all(
      index.filter((e) => e.state === "READY").map(async (e) => {
        const meta = await fetch(api(`v2/models/${encodeURIComponent(e.name)}`));
        if (meta.ok) modelInfo.set(e.name, (await meta.json()).parameters || {});
      }),
    );
    // Choosable only once every model's note is known: a model picked before its metadata arrived showed none.
    modelSelect.disabled = !firstReady;
    showModelNote();
  } catch (err) {
    statusLine.textContent = `Could not list the models: ${err.message}`;
  }
}

function showModelNote() {
  const info = modelInfo.get(modelSelect.value) || {};
  const random = info.weights === "random";
  const unlabelled = typeof info.labels === "string" && info.labels.startsWith("none");
  modelNote.hidden = !random && !unlabelled;
  modelNote.textContent = random
    ? "This model has random weights: good for timing, its labels mean nothing."
    : unlabelled ? "This model has no labels: classes are shown by index." : "";
}

function card(file) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  const thumb = node.querySelector(".thumb");
  thumb.src = URL.createObjectURL(file);
  thumb.alt = file.name;
  node.querySelector(".name").textContent = file.name;
  node.classList.add("pending");
  results.prepend(node);
  return node;
}

function serverTiming(response) {
  // "read;dur=0.41, decode;dur=3.02, infer;dur=21.70" -> "read 0.4 · decode 3.0 · infer 21.7 ms"
  const header = response.headers.get("Server-Timing");
  if (!header) return "";
  const parts = header.split(",").map((p) => {
    const [name, ...params] = p.trim().split(";");
    const dur = params.find((q) => q.trim().startsWith("dur="));
    return dur ? `${name} ${Number(dur.split("=")[1]).toFixed(1)}` : name;
  });
  return ` (server: ${parts.join(" · ")} ms)`;
}

function render(node, prediction, elapsedMs, timing) {
  const list = node.querySelector(".top");
  list.replaceChildren();
  for (const [key, probability] of Object.entries(prediction)) {
    const colon = key.indexOf(":");
    const label = colon >= 0 ? key.slice(colon + 1) : `class ${key}`;  // a model without labels
    const index = colon >= 0 ? key.slice(0, colon) : key;
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    name.title = `class ${index}: ${label}`;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(probability * 100).toFixed(1)}%`;
    item.append(name, bar, pct);
    list.append(item);
  }
  node.querySelector(".time").textContent = `${elapsedMs.toFixed(0)} ms${timing}`;
}

function fail(node, message) {
  const error = node.querySelector(".error");
  error.textContent = message;
  error.hidden = false;
  node.querySelector(".top").replaceChildren();
}

async function classify(file, model) {
  const node = card(file);
  const form = new FormData();
  form.append("images", file, file.name);
  const url = api("classify");
  url.searchParams.set("model", model);
  url.searchParams.set("topk", String(TOP_K));
  url.searchParams.set("labels", "true");
  const started = performance.now();
  try {
    const response = await fetch(url, { method: "POST", body: form });
    const elapsed = performance.now() - started;
    if (!response.ok) {
      fail(node, await errorText(response));
      return false;
    }
    const [prediction] = await response.json();
    render(node, prediction, elapsed, serverTiming(response));
    return true;
  } catch (err) {
    fail(node, `request failed: ${err.message}`);
    return false;
  } finally {
    node.classList.remove("pending");
  }
}

async function classifyAll(fileList) {
  const files = Array.from(fileList).filter((f) => f.size > 0);
  if (!files.length || modelSelect.disabled) return;
  const model = modelSelect.value;
  statusLine.textContent = `Classifying ${files.length} image${files.length > 1 ? "s" : ""} with ${model}…`;
  const started = performance.now();
  // All at once: the server's dynamic batcher puts concurrent images into shared forward passes.
  const outcomes = await Promise.all(files.map((f) => classify(f, model)));
  const ok = outcomes.filter(Boolean).length;
  const total = performance.now() - started;
  statusLine.textContent = `${ok} of ${files.length} classified with ${model} in ${total.toFixed(0)} ms.`;
}

input.addEventListener("change", () => {
  classifyAll(input.files);
  input.value = "";
});
modelSelect.addEventListener("change", showModelNote);
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") {
    e.preventDefault();
    input.click();
  }
});
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  classifyAll(e.dataTransfer.files);
});
// Dropping outside the zone must not navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

loadModels();
