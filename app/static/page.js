// The page at /: pages through GET /tasks (search by name), classifies images with POST /classify
// (one request per image).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 24; // cards per page: a store may hold 10,000 tasks
const state = { task: null, tasks: [], query: "", cursors: [null], next: null, total: 0, backbone: false };

// An element with attributes and children (strings become text: never innerHTML).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// The server's own reason: {"detail": "..."} (or FastAPI's list of field errors, or {"error": ...}).
async function serverMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const reason = body.detail ?? body.error;
    if (typeof reason === "string") return reason;
    if (Array.isArray(reason)) return reason.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  } catch (_) { /* not JSON: fall through */ }
  return `HTTP ${response.status} ${response.statusText}${text ? ": " + text.slice(0, 200) : ""}`;
}

const fmt = {
  int: (n) => n.toLocaleString("en-US"),
  bytes: (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} kB` : `${(n / 1048576).toFixed(1)} MB`),
  pct: (v) => `${(v <= 1 ? v * 100 : v).toFixed(1)}%`,
  when: (t) => new Date(t * 1000).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }),
};

const SOURCES = {
  "in-house": "in-house, shipped in the package",
  hub: "model hub",
  "local file": "local checkpoint file",
  random: "random init (no weights)",
};

function showBackbone(b) {
  const facts = [
    ["name", b.name],
    ["weights", [SOURCES[b.source] || b.source, b.weights ? el("span", { class: "sub" }, b.weights) : null]],
    ["device", b.device],
    ["dtype", b.dtype],
    ["input", b.input_size.join(" × ")],
    ["strategy", b.strategy],
    ["fingerprint", b.fingerprint.slice(0, 12) + "…"],
  ];
  $("backbone").replaceChildren(...facts.map(([k, v]) =>
    el("div", {}, el("dt", {}, k), el("dd", k === "fingerprint" ? { title: b.fingerprint } : {}, ...[v].flat()))));
  $("backbone").dataset.source = b.source;
  if (b.random_weights) {
    $("backbone-warning").textContent = "This backbone has random weights: its predictions are meaningless.";
    $("backbone-warning").hidden = false;
  }
}

// Accuracy lines from the trainer's metrics, and how the reported epoch was selected.
function accuracyOf(metrics) {
  const lines = [];
  const named = { test_top1: "test top-1", val_top1: "val top-1", test_top1_at_best_val: "test top-1 at best val" };
  for (const [key, label] of Object.entries(named)) {
    if (typeof metrics[key] === "number") lines.push([fmt.pct(metrics[key]), label]);
  }
  for (const [key, value] of Object.entries(metrics)) {
    if (!(key in named) && typeof value === "number" && /top1|acc/i.test(key) && !/epoch/.test(key)) {
      lines.push([fmt.pct(value), key.replaceAll("_", " ")]);
    }
  }
  let selection = metrics.selection || "";
  if (typeof metrics.best_val_epoch === "number") selection += ` (best val at epoch ${metrics.best_val_epoch})`;
  if (typeof metrics.epochs === "number") selection = `${metrics.epochs} epochs; ${selection || "selection not recorded"}`;
  return { lines, selection: selection || "selection not recorded" };
}

function taskCard(t) {
  if (t.state !== "loaded") {
    return el("label", { class: "card skipped" },
      el("input", { type: "radio", name: "task", value: t.name, disabled: "" }),
      el("span", { class: "card-head" }, el("span", { class: "task-name" }, t.name), el("span", { class: "badge" }, "refused")),
      el("span", { class: "reason" }, t.reason || "not served"));
  }
  const { lines, selection } = accuracyOf(t.metrics || {});
  const shown = t.labels.slice(0, 12);
  const more = t.labels.length - shown.length;
  return el("label", { class: "card", "data-task": t.name },
    el("input", { type: "radio", name: "task", value: t.name }),
    el("span", { class: "card-head" },
      el("span", { class: "task-name" }, t.name),
      el("span", { class: "badge", title: "adapter version (sha256 of its weights)" }, t.version)),
    el("span", { class: "accuracy" }, ...(lines.length ? lines.map(([v, what]) =>
      el("span", {}, el("b", {}, v), " ", what)) : [el("span", { class: "muted" }, "no accuracy recorded")])),
    el("span", { class: "selection" }, selection),
    el("span", { class: "labels", "aria-label": `${t.num_classes} labels` },
      ...shown.map((l) => el("span", { class: "chip" }, l)),
      more > 0 ? el("span", { class: "chip more" }, `+${more} more`) : null),
    el("span", { class: "meta" },
      `${t.num_classes} classes · ${fmt.int(t.parameters)} parameters · ${fmt.bytes(t.bytes)}`,
      el("br"), TIERS[t.tier] || t.tier, t.pinned ? " · pinned" : "",
      t.loaded_at ? ` · loaded ${fmt.when(t.loaded_at)}` : ""));
}

const TIERS = {
  stored: "in the store (read on its first request)",
  resident: "in memory",
  folded: "in memory, folded",
};

function chooseTask(name) {
  state.task = name;
  $("chosen").textContent = name || "—";
  for (const input of document.querySelectorAll('input[name="task"]')) input.checked = input.value === name;
  if (name) history.replaceState(null, "", `#${encodeURIComponent(name)}`);
}

// One page of tasks: the current search, after the cursor at the top of the stack.
async function loadTasks() {
  const params = new URLSearchParams({ limit: PAGE });
  const cursor = state.cursors[state.cursors.length - 1];
  if (cursor) params.set("cursor", cursor);
  if (state.query) params.set("name", state.query);
  let body;
  try {
    const response = await fetch(`/tasks?${params}`);
    if (!response.ok) throw new Error(await serverMessage(response));
    body = await response.json();
  } catch (err) {
    $("tasks-error").textContent = `Cannot list the tasks: ${err.message}`;
    $("tasks-error").hidden = false;
    return;
  }
  $("tasks-error").hidden = true;
  if (!state.backbone) { showBackbone(body.backbone); state.backbone = true; }
  state.tasks = body.tasks;
  state.next = body.next_cursor;
  state.total = body.total;
  showPage();
}

function showPage() {
  const first = (state.cursors.length - 1) * PAGE;
  const noun = state.query ? `matching “${state.query}”` : "in the store";
  $("task-count").textContent = `(${fmt.int(state.total)} ${noun})`;
  $("page-info").textContent = state.total
    ? `${fmt.int(first + 1)}–${fmt.int(first + state.tasks.length)} of ${fmt.int(state.total)}` : "no task";
  $("prev-page").disabled = state.cursors.length < 2;
  $("next-page").disabled = !state.next;
  const legend = $("tasks").querySelector("legend");
  $("tasks").replaceChildren(legend, ...state.tasks.map(taskCard));
  chooseTask(state.task);  // checks its card if it is on this page
}

async function start() {
  await loadTasks();
  const wanted = fragmentTask();
  let chosen = state.tasks.find((t) => t.state === "loaded")?.name ?? null;
  if (wanted && wanted !== chosen) {  // a task on another page (or past the first 24)
    const response = await fetch(`/tasks/${encodeURIComponent(wanted)}`);
    if (response.ok && (await response.json()).state === "loaded") chosen = wanted;
  }
  chooseTask(chosen);
  document.body.dataset.ready = "true";
}

function turnPage(forward) {
  if (forward && state.next) state.cursors.push(state.next);
  else if (!forward && state.cursors.length > 1) state.cursors.pop();
  else return;
  loadTasks();
}

let searchTimer = null;
function search(query) {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {  // one request per pause in typing, not per key
    state.query = query.trim();
    state.cursors = [null];
    loadTasks();
  }, 200);
}

function fragmentTask() {
  // The task named after '#'; a malformed escape (#%E0%A4%A) names none, and must not stop the page.
  try {
    return decodeURIComponent(location.hash.slice(1));
  } catch {
    return "";
  }
}

function resultRow(file, task, k) {
  const thumb = el("img", { class: "thumb", alt: file.name || "pasted image" });
  const url = URL.createObjectURL(file);
  thumb.src = url;
  thumb.onerror = () => thumb.replaceWith(el("div", { class: "thumb none" }, "no preview"));
  const body = el("div", { class: "result-body" },
    el("div", { class: "result-head" }, el("span", { class: "file" }, file.name || "pasted image"),
      el("span", { class: "muted" }, `${task} · top ${k}`)),
    el("p", { class: "pending" }, "classifying…"));
  const row = el("li", { class: "result", "aria-busy": "true" }, el("div", { class: "thumb-box" }, thumb), body);
  return { row, body, url };
}

function showPredictions(body, answer, roundTripMs) {
  const list = el("ol", { class: "predictions" }, ...answer.results[0].predictions.map((p, i) =>
    el("li", { class: i === 0 ? "prediction best" : "prediction" },
      el("span", { class: "label" }, p.label),
      el("span", { class: "bar", role: "img", "aria-label": `${(p.score * 100).toFixed(1)} percent` },
        el("span", { class: "fill", style: { width: `${Math.max(p.score * 100, 0.5)}%` } })),
      el("span", { class: "score" }, `${(p.score * 100).toFixed(1)}%`))));
  const time = el("p", { class: "time muted" },
    `${answer.time_ms.toFixed(1)} ms in the server · ${roundTripMs.toFixed(0)} ms round trip`);
  body.querySelector(".pending").replaceWith(list, time);
}

async function classify(file) {
  const task = state.task;
  const k = Math.min(Math.max(parseInt($("top-k").value, 10) || 3, 1), 1000);
  const { row, body, url } = resultRow(file, task, k);
  $("results").prepend(row);
  const form = new FormData();
  form.append("file", file, file.name || "pasted");
  const start = performance.now();
  try {
    const response = await fetch(`/classify?task=${encodeURIComponent(task)}&top_k=${k}`, { method: "POST", body: form });
    if (!response.ok) throw new Error(await serverMessage(response));
    showPredictions(body, await response.json(), performance.now() - start);
  } catch (err) {
    row.classList.add("failed");
    body.querySelector(".pending").replaceWith(el("p", { class: "error", role: "alert" }, err.message));
  } finally {
    row.removeAttribute("aria-busy");
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }
}

function classifyAll(files) {
  const list = Array.from(files || []);
  if (!list.length) return;
  if (!state.task) {
    $("status").textContent = "No task is served: nothing to classify with.";
    return;
  }
  $("status").textContent = `Classifying ${list.length} image${list.length > 1 ? "s" : ""} with ${state.task}…`;
  Promise.all(list.map(classify)).then(() => { $("status").textContent = ""; });
}

function wire() {
  $("tasks").addEventListener("change", (e) => { if (e.target.name === "task") chooseTask(e.target.value); });
  $("task-search").addEventListener("input", (e) => search(e.target.value));
  $("prev-page").addEventListener("click", () => turnPage(false));
  $("next-page").addEventListener("click", () => turnPage(true));
  $("files").addEventListener("change", (e) => { classifyAll(e.target.files); e.target.value = ""; });
  $("clear").addEventListener("click", () => $("results").replaceChildren());
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); classifyAll(e.dataTransfer.files); });
  document.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData?.files || []);
    if (files.length) { e.preventDefault(); classifyAll(files); }
  });
}

wire();
start();
