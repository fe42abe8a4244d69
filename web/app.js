// The inpainting page: pick an image, paint a hole (1 = hole), ask the server to decode it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  size: 64,
  source: null,      // the server's id of the image being edited
  base: null,        // its pixels, RGBA (size*size*4)
  hole: null,        // Uint8Array(size*size), 1 = hole
  tool: "brush",
  last: null,        // last brush position while painting
  box: null,         // {x0, y0, x1, y1} while dragging a box
  busy: false,
  maskSeq: 0,
  resultId: null,
  resultKind: null,
};

// ---- talking to the server: every failure becomes one message on the page ----
async function api(url, body, raw) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: {"Content-Type": raw ? "application/octet-stream" : "application/json"},
    body: raw ? body : JSON.stringify(body),
  };
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (e) {
    throw new Error("the server cannot be reached (is app.py still running?)");
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) throw new Error((data && data.error) || `the server answered ${resp.status} ${resp.statusText}`);
  return data;
}

function showMessage(text) {
  const m = $("message");
  m.textContent = text || "";
  m.hidden = !text;
}

function setBusy(busy) {
  state.busy = busy;
  $("inpaint").disabled = busy;
  $("generate").disabled = busy;
  $("busy").hidden = !busy;
}

// ---- the editor: image + hole overlay on a size x size canvas, shown enlarged ----
function render() {
  const n = state.size, ctx = $("editor").getContext("2d");
  const img = ctx.createImageData(n, n);
  const b = state.box && normBox(state.box);
  for (let i = 0; i < n * n; i++) {
    const x = i % n, y = (i - x) / n;
    const inBox = b && x >= b.x0 && x <= b.x1 && y >= b.y0 && y <= b.y1;
    const hole = state.hole[i] || inBox;
    for (let c = 0; c < 3; c++) {
      const v = state.base ? state.base[4 * i + c] : 200;
      const tint = [255, 47, 180][c];
      img.data[4 * i + c] = hole ? Math.round(0.35 * v + 0.65 * tint) : v;
    }
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

function toPixel(ev) {
  const r = $("editor").getBoundingClientRect();
  return {x: (ev.clientX - r.left) / r.width * state.size, y: (ev.clientY - r.top) / r.height * state.size};
}

function stamp(p, value) {
  const n = state.size, rad = Number($("brush-size").value) / 2;
  for (let y = Math.floor(p.y - rad); y <= Math.ceil(p.y + rad); y++) {
    for (let x = Math.floor(p.x - rad); x <= Math.ceil(p.x + rad); x++) {
      if (x < 0 || y < 0 || x >= n || y >= n) continue;
      const dx = x + 0.5 - p.x, dy = y + 0.5 - p.y;
      if (dx * dx + dy * dy <= rad * rad + 0.25) state.hole[y * n + x] = value;
    }
  }
}

function strokeTo(p) {
  const value = state.tool === "eraser" ? 0 : 1, a = state.last || p;
  const steps = Math.max(1, Math.ceil(Math.hypot(p.x - a.x, p.y - a.y) * 2));
  for (let s = 1; s <= steps; s++) stamp({x: a.x + (p.x - a.x) * s / steps, y: a.y + (p.y - a.y) * s / steps}, value);
  state.last = p;
}

function normBox(b) {
  const n = state.size, clamp = (v) => Math.min(n - 1, Math.max(0, Math.floor(v)));
  return {x0: clamp(Math.min(b.x0, b.x1)), x1: clamp(Math.max(b.x0, b.x1)),
          y0: clamp(Math.min(b.y0, b.y1)), y1: clamp(Math.max(b.y0, b.y1))};
}

function onDown(ev) {
  if (!state.hole) return;
  ev.preventDefault();
  $("editor").setPointerCapture(ev.pointerId);
  const p = toPixel(ev);
  if (state.tool === "box") state.box = {x0: p.x, y0: p.y, x1: p.x, y1: p.y};
  else { state.last = null; strokeTo(p); }
  render();
}

function onMove(ev) {
  const p = toPixel(ev);
  if (state.box) { state.box.x1 = p.x; state.box.y1 = p.y; render(); }
  else if (state.last) { strokeTo(p); render(); }
}

function onUp() {
  if (state.box) {
    const b = normBox(state.box), n = state.size;
    for (let y = b.y0; y <= b.y1; y++) for (let x = b.x0; x <= b.x1; x++) state.hole[y * n + x] = 1;
    state.box = null;
  } else if (!state.last) {
    return;
  }
  state.last = null;
  render();
  updateTokenMask();
}

function holeString() { return Array.from(state.hole, (v) => (v ? "1" : "0")).join(""); }

// the server applies the lab's rule (a token is known only if all its pixels are)
async function updateTokenMask() {
  const seq = ++state.maskSeq;
  try {
    const r = await api("/api/token-mask", {hole: holeString()});
    if (seq !== state.maskSeq) return;
    $("token-mask").src = r.token_mask;
    $("token-count").textContent = `${r.masked_tokens} / ${r.tokens} masked`;
  } catch (e) { showMessage(e.message); }
}

function loadPixels(url) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => {
      const c = document.createElement("canvas");
      c.width = c.height = state.size;
      const ctx = c.getContext("2d");
      ctx.drawImage(im, 0, 0, state.size, state.size);
      resolve(ctx.getImageData(0, 0, state.size, state.size).data);
    };
    im.onerror = () => reject(new Error("the browser could not show the image"));
    im.src = url;
  });
}

async function setSource(d, keepHole) {
  state.base = await loadPixels(d.image);
  state.source = d.id;
  if (!keepHole) state.hole = Uint8Array.from(d.hole, (ch) => (ch === "1" ? 1 : 0));
  $("source-note").textContent = d.note || "";
  $("editor").dataset.source = d.id;
  render();
  await updateTokenMask();
}

async function pick(id) {
  showMessage("");
  try { await setSource(await api("/api/source?id=" + encodeURIComponent(id))); }
  catch (e) { showMessage(e.message); }
}

async function upload() {
  const f = $("upload").files[0];
  if (!f) return;
  showMessage("");
  try {
    if (f.size > state.info.max_upload_bytes) {
      throw new Error(`the file is larger than ${Math.round(state.info.max_upload_bytes / 2 ** 20)} MB`);
    }
    await setSource(await api("/api/upload", f, true));
  } catch (e) {
    showMessage(e.message);
  } finally {
    $("upload").value = "";
  }
}

// ---- decoding ----
function options() {
  const temp = $("choice-temperature").value;
  return {
    mask_func: $("mask-func").value,
    total_iter: Number($("total-iter").value),
    token_choice: $("token-choice").value,
    sample_temperature: Number($("sample-temperature").value),
    confidence: $("confidence").value,
    order: $("order").value,
    choice_temperature: temp === "" ? null : Number(temp),
    paste_known: $("paste-known").checked,
    refine: Number($("refine").value),
    seed: Number($("seed").value),
  };
}

async function showResult(r, t0, kind) {
  $("input-img").src = r.input;
  $("used-token-mask").src = r.token_mask;
  $("download").href = r.result;
  $("download-mask").href = r.mask;
  const steps = $("steps");
  steps.replaceChildren();
  r.steps.forEach((src, t) => {
    const fig = document.createElement("figure");
    const im = document.createElement("img"), mk = document.createElement("img");
    const cap = document.createElement("figcaption");
    im.className = "pix step-image"; im.src = src; im.alt = `step ${t + 1}`;
    mk.className = "pix step-mask"; mk.src = r.step_masks[t]; mk.alt = `mask after step ${t + 1}`;
    cap.textContent = `t = ${t + 1}`;
    fig.append(im, mk, cap);
    steps.append(fig);
  });
  const res = $("result-img");
  res.src = r.result;
  await res.decode();
  const seconds = (performance.now() - t0) / 1000;
  state.resultId = r.result_id;
  state.resultKind = kind;
  $("timing").textContent = `${r.masked_tokens} tokens decoded in ${r.steps.length} steps · ` +
    `button to result ${seconds.toFixed(2)} s (model ${r.seconds.toFixed(2)} s)`;
  const panel = $("result-panel");
  panel.hidden = false;
  panel.dataset.seconds = seconds.toFixed(3);
  panel.dataset.modelSeconds = r.seconds.toFixed(3);
  panel.dataset.kind = kind;
  panel.dataset.run = String(Number(panel.dataset.run) + 1);
}

async function run(kind) {
  if (state.busy) return;
  showMessage("");
  const t0 = performance.now();
  setBusy(true);
  try {
    let r;
    if (kind === "inpaint") {
      if (!state.source) throw new Error("pick or upload an image first");
      r = await api("/api/inpaint", {source: state.source, hole: holeString(), ...options()});
    } else {
      r = await api("/api/generate", options());
    }
    await showResult(r, t0, kind);
  } catch (e) {
    showMessage(e.message);
  } finally {
    setBusy(false);
  }
}

async function editResult() {
  if (!state.resultId) return;
  try {
    const d = await api("/api/source?id=" + encodeURIComponent(state.resultId));
    await setSource(d, state.resultKind === "inpaint");
  } catch (e) { showMessage(e.message); }
}

// ---- start-up ----
function fillSelect(sel, values, chosen) {
  sel.replaceChildren(...values.map((v) => new Option(v, v, false, v === chosen)));
}

async function init() {
  const info = state.info = await api("/api/info");
  state.size = info.image_size;
  state.hole = new Uint8Array(state.size * state.size);
  document.querySelectorAll(".size").forEach((s) => { s.textContent = info.image_size; });
  $("editor").width = $("editor").height = info.image_size;
  $("model-info").textContent = info.model;
  const d = info.defaults;
  fillSelect($("mask-func"), info.schedules, d.mask_func);
  fillSelect($("token-choice"), info.token_choices, d.token_choice);
  fillSelect($("confidence"), info.confidences, d.confidence);
  fillSelect($("order"), info.orders, d.order);
  $("total-iter").value = d.total_iter;
  $("choice-temperature").value = d.choice_temperature;
  $("sample-temperature").value = d.sample_temperature;
  $("seed").value = d.seed;
  $("paste-known").checked = d.paste_known;
  $("refine").value = d.refine;
  for (const name of info.examples) {
    const b = document.createElement("button");
    b.type = "button"; b.title = name; b.className = "example"; b.dataset.id = "example:" + name;
    b.innerHTML = `<img class="pix" src="/static/examples/${name}.png" alt="${name}">`;
    b.addEventListener("click", () => pick(b.dataset.id));
    $("examples").append(b);
  }
  if (info.lab) {
    $("lab-row").hidden = false;
    $("lab-index").max = info.lab.count - 1;
    $("load-lab").addEventListener("click", () => pick("lab:" + $("lab-index").value));
    $("random-lab").addEventListener("click", () => {
      $("lab-index").value = Math.floor(Math.random() * info.lab.count);
      pick("lab:" + $("lab-index").value);
    });
  }
  const ed = $("editor");
  ed.addEventListener("pointerdown", onDown);
  ed.addEventListener("pointermove", onMove);
  ed.addEventListener("pointerup", onUp);
  ed.addEventListener("pointercancel", onUp);
  document.querySelectorAll("input[name=tool]").forEach((r) => {
    r.addEventListener("change", () => { state.tool = r.value; });
  });
  $("clear-hole").addEventListener("click", () => { state.hole.fill(0); render(); updateTokenMask(); });
  $("upload").addEventListener("change", upload);
  $("inpaint").addEventListener("click", () => run("inpaint"));
  $("generate").addEventListener("click", () => run("generate"));
  $("use-result").addEventListener("click", editResult);
  await pick(info.lab ? "lab:0" : "example:" + info.examples[0]);
  document.body.dataset.ready = "1";
}

init().catch((e) => showMessage(e.message));
