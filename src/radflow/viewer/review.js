(function () {
"use strict";
const DATA = JSON.parse(document.getElementById("radflow-data").textContent);
const CASES = DATA.cases;
const GROUP_NAMES = {TP: "True positive", FP: "False positive", FN: "False negative",
  TN: "True negative", positive: "Predicted positive (no label)",
  negative: "Predicted negative (no label)", unlabelled: "Unlabelled"};
const GROUP_COLOURS = {TP: "var(--tp)", FP: "var(--fp)", FN: "var(--fn)", TN: "var(--tn)",
  positive: "var(--fp)", negative: "var(--tn)", unlabelled: "var(--unlabelled)"};
// A view shows the plane through pos[fixed]; screen x runs along axis h, screen y along axis v.
// Both run against the RAS+ axes: patient's right / anterior / superior sit left / up.
const VIEWS = {
  axial: {fixed: 2, h: 0, v: 1, name: "z"},
  coronal: {fixed: 1, h: 0, v: 2, name: "y"},
  sagittal: {fixed: 0, h: 1, v: 2, name: "x"},
};
const CACHE_MAX = 24;
const cache = new Map();
const $ = (id) => document.getElementById(id);
const state = {index: -1, vol: null, pos: [0, 0, 0], token: 0, scale: 1};
let readyResolve;
const api = {
  ready: new Promise((resolve) => { readyResolve = resolve; }),
  currentCase: null,
  renderCount: 0,
  state: state,
  select: (caseId) => select(CASES.findIndex((c) => c.id === caseId)),
};
window.radflowViewer = api;

// ---------- colour map (jet) with a transparent low end ----------
const LUT = new Float32Array(256 * 3);
for (let i = 0; i < 256; i++) {
  const t = i / 255;
  const f = (x) => Math.min(1, Math.max(0, 1.5 - Math.abs(4 * t - x)));
  LUT[3 * i] = 255 * f(3); LUT[3 * i + 1] = 255 * f(2); LUT[3 * i + 2] = 255 * f(1);
}
const ALPHA = new Float32Array(256);
function updateAlpha() {
  const opacity = $("opacity").value / 100;
  const floor = $("cam-floor").value / 100;
  const ramp = 0.15;
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    ALPHA[i] = t < floor ? 0 : opacity * Math.min(1, (t - floor) / ramp + 0.25);
  }
  drawColorbar();
}
function drawColorbar() {
  const cv = $("colorbar"), ctx = cv.getContext("2d");
  const img = ctx.createImageData(cv.width, cv.height);
  const floor = $("cam-floor").value / 100;
  for (let x = 0; x < cv.width; x++) {
    const i = Math.round(255 * x / (cv.width - 1));
    const dim = i / 255 < floor ? 0.25 : 1;
    for (let y = 0; y < cv.height; y++) {
      const o = 4 * (y * cv.width + x);
      img.data[o] = LUT[3 * i] * dim; img.data[o + 1] = LUT[3 * i + 1] * dim;
      img.data[o + 2] = LUT[3 * i + 2] * dim; img.data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
}

// ---------- formatting ----------
function fmt(v) {
  if (v === null || v === undefined) return "\u2014";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
    return String(Number(v.toFixed(a >= 100 ? 1 : 4)));
  }
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}
const labelText = (l) => (l === null ? "\u2014" : l === 1 ? "positive" : "negative");
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// ---------- header, list ----------
function buildMeta() {
  const box = $("meta");
  for (const [k, v] of Object.entries(DATA.meta || {})) {
    const s = el("span", null, k + ": ");
    s.appendChild(el("b", null, fmt(v)));
    box.appendChild(s);
  }
}
function buildList() {
  const list = $("case-list");
  const counts = {};
  for (const c of CASES) counts[c.group] = (counts[c.group] || 0) + 1;
  $("case-count").textContent = "(" + CASES.length + ")";
  let group = null;
  CASES.forEach((c, i) => {
    if (c.group !== group) {
      group = c.group;
      const h = el("div", "group-head");
      h.dataset.group = group;
      const dot = el("span", "dot");
      dot.style.background = GROUP_COLOURS[group];
      h.appendChild(dot);
      h.appendChild(el("span", null, GROUP_NAMES[group] + " (" + group + ")"));
      h.appendChild(el("span", "count", String(counts[group])));
      list.appendChild(h);
    }
    const item = el("div", "case-item");
    item.dataset.case = c.id;
    item.dataset.index = String(i);
    item.title = c.id;
    item.appendChild(el("span", "cid", c.id));
    item.appendChild(el("span", "prob", "p " + Number(c.probability).toFixed(3)));
    item.appendChild(el("span", "lab", c.label === null ? "\u2014" : "y=" + c.label));
    item.addEventListener("click", () => select(i));
    list.appendChild(item);
  });
}

// ---------- volumes ----------
async function loadVolumes(i) {
  if (cache.has(i)) {
    const v = cache.get(i);
    cache.delete(i); cache.set(i, v);
    return v;
  }
  const c = CASES[i];
  const text = $("vol-" + i).textContent.trim();
  const bin = atob(text);
  const bytes = new Uint8Array(bin.length);
  for (let k = 0; k < bin.length; k++) bytes[k] = bin.charCodeAt(k);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const buf = new Uint8Array(await new Response(stream).arrayBuffer());
  const n = c.shape[0] * c.shape[1] * c.shape[2];
  if (buf.length !== 3 * n) throw new Error("case " + c.id + ": volume data has wrong size");
  const vol = {ct: buf.subarray(0, n), cam: buf.subarray(n, 2 * n),
    roi: buf.subarray(2 * n, 3 * n)};
  cache.set(i, vol);
  while (cache.size > CACHE_MAX) cache.delete(cache.keys().next().value);
  return vol;
}

// ---------- layout ----------
function layout() {
  if (state.index < 0) return;
  const c = CASES[state.index];
  const ext = [0, 1, 2].map((a) => c.shape[a] * c.spacing[a]);
  const views = $("views");
  // room left beside each canvas: figure padding and border, gaps, a little slack
  const availW = Math.max(240, views.clientWidth - 3 * 18 - 2 * 14 - 12);
  const top = views.getBoundingClientRect().top - $("main").getBoundingClientRect().top;
  const availH = Math.max(200, window.innerHeight - top - 110);
  let k = Math.min(availW / (2 * ext[0] + ext[1]), availH / Math.max(ext[1], ext[2]));
  k = Math.max(k, 160 / Math.max(ext[0], ext[1], ext[2]));
  state.scale = k;
  const dpr = window.devicePixelRatio || 1;
  for (const [name, v] of Object.entries(VIEWS)) {
    const cv = $("canvas-" + name);
    const w = Math.round(ext[v.h] * k), h = Math.round(ext[v.v] * k);
    cv.style.width = w + "px"; cv.style.height = h + "px";
    cv.width = Math.round(w * dpr); cv.height = Math.round(h * dpr);
  }
}

// ---------- rendering ----------
const offscreen = document.createElement("canvas");
function renderView(name) {
  const v = VIEWS[name], c = CASES[state.index], vol = state.vol;
  const cv = $("canvas-" + name), ctx = cv.getContext("2d");
  const S = c.shape, stride = [S[1] * S[2], S[2], 1];
  const nh = S[v.h], nv = S[v.v];
  const base = state.pos[v.fixed] * stride[v.fixed];
  const showCam = $("toggle-cam").checked;
  offscreen.width = nh; offscreen.height = nv;
  const octx = offscreen.getContext("2d");
  const img = octx.createImageData(nh, nv);
  const d = img.data;
  for (let r = 0; r < nv; r++) {
    const rowBase = base + (nv - 1 - r) * stride[v.v];
    for (let col = 0; col < nh; col++) {
      const idx = rowBase + (nh - 1 - col) * stride[v.h];
      const g = vol.ct[idx];
      const o = 4 * (r * nh + col);
      let R = g, G = g, B = g;
      if (showCam) {
        const t = vol.cam[idx], a = ALPHA[t];
        if (a > 0) {
          R = g + (LUT[3 * t] - g) * a;
          G = g + (LUT[3 * t + 1] - g) * a;
          B = g + (LUT[3 * t + 2] - g) * a;
        }
      }
      d[o] = R; d[o + 1] = G; d[o + 2] = B; d[o + 3] = 255;
    }
  }
  octx.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, cv.width, cv.height);
  ctx.drawImage(offscreen, 0, 0, cv.width, cv.height);
  const px = cv.width / nh, py = cv.height / nv;
  const dpr = window.devicePixelRatio || 1;
  if ($("toggle-roi").checked) {
    const inside = (rr, cc) => rr >= 0 && rr < nv && cc >= 0 && cc < nh &&
      vol.roi[base + (nv - 1 - rr) * stride[v.v] + (nh - 1 - cc) * stride[v.h]] !== 0;
    const path = new Path2D();
    for (let r = 0; r < nv; r++) {
      for (let col = 0; col < nh; col++) {
        if (!inside(r, col)) continue;
        const x0 = col * px, y0 = r * py, x1 = x0 + px, y1 = y0 + py;
        if (!inside(r, col - 1)) { path.moveTo(x0, y0); path.lineTo(x0, y1); }
        if (!inside(r, col + 1)) { path.moveTo(x1, y0); path.lineTo(x1, y1); }
        if (!inside(r - 1, col)) { path.moveTo(x0, y0); path.lineTo(x1, y0); }
        if (!inside(r + 1, col)) { path.moveTo(x0, y1); path.lineTo(x1, y1); }
      }
    }
    ctx.strokeStyle = "#ff4fd8";
    ctx.lineWidth = Math.max(1, 1.5 * dpr);
    ctx.stroke(path);
  }
  if ($("toggle-crosshair").checked) {
    const cx = (nh - 1 - state.pos[v.h] + 0.5) * px;
    const cy = (nv - 1 - state.pos[v.v] + 0.5) * py;
    const gap = Math.max(px, py, 8 * dpr);
    ctx.strokeStyle = "rgba(255, 214, 10, 0.75)";
    ctx.lineWidth = Math.max(1, dpr);
    ctx.beginPath();
    ctx.moveTo(cx, 0); ctx.lineTo(cx, cy - gap);
    ctx.moveTo(cx, cy + gap); ctx.lineTo(cx, cv.height);
    ctx.moveTo(0, cy); ctx.lineTo(cx - gap, cy);
    ctx.moveTo(cx + gap, cy); ctx.lineTo(cv.width, cy);
    ctx.stroke();
  }
  const n = S[v.fixed], s = state.pos[v.fixed];
  const mm = (s * c.spacing[v.fixed]).toFixed(1);
  $("label-" + name).textContent = v.name + " " + s + " / " + (n - 1) + " \u00b7 " + mm + " mm";
  $("slider-" + name).value = String(s);
}
let frame = 0;
function renderAll() {
  if (frame) { cancelAnimationFrame(frame); frame = 0; }
  if (!state.vol) return;
  for (const name of Object.keys(VIEWS)) renderView(name);
  api.renderCount += 1;
}
// Dragging and the wheel draw once per frame; the sliders follow at once.
function scheduleRender() {
  for (const [name, v] of Object.entries(VIEWS)) {
    $("slider-" + name).value = String(state.pos[v.fixed]);
  }
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; renderAll(); });
}

// ---------- case panel ----------
function showCase(c) {
  $("case-title").textContent = c.id;
  const badge = $("case-badge");
  badge.textContent = c.group;
  badge.style.background = GROUP_COLOURS[c.group];
  $("case-group").textContent = GROUP_NAMES[c.group];
  const rows = [["probability", fmt(c.probability)], ["threshold", fmt(c.threshold)],
    ["prediction", c.prediction + " (" + labelText(c.prediction) + ")"],
    ["label", c.label === null ? "\u2014" : c.label + " (" + labelText(c.label) + ")"],
    ["confidence", fmt(c.confidence)], ["split", c.split], ["group", c.group]];
  const extra = Object.entries(c.numbers).map(([k, v]) => [k, fmt(v), true]);
  const geometry = [["voxels", c.shape.join("\u00d7")],
    ["spacing mm", c.spacing.map((s) => fmt(s)).join("\u00d7")],
    ["CAM peak", c.peak.join(", ")]];
  const box = $("numbers");
  box.textContent = "";
  for (const [k, v, isExtra] of rows.concat(extra, geometry)) {
    const item = el("div", isExtra ? "num extra" : "num");
    item.dataset.key = k;
    item.appendChild(el("dt", null, k));
    item.appendChild(el("dd", null, v));
    box.appendChild(item);
  }
  for (const [name, v] of Object.entries(VIEWS)) {
    const sl = $("slider-" + name);
    sl.max = String(c.shape[v.fixed] - 1);
  }
}

async function select(i) {
  if (i < 0 || i >= CASES.length) return;
  const token = ++state.token;
  const c = CASES[i];
  document.querySelectorAll(".case-item.selected").forEach((e) => e.classList.remove("selected"));
  const item = document.querySelector('.case-item[data-index="' + i + '"]');
  item.classList.add("selected");
  item.scrollIntoView({block: "nearest"});
  let vol;
  try {
    vol = await loadVolumes(i);
  } catch (err) {
    $("message").textContent = "Cannot show case " + c.id + ": " + err.message;
    throw err;
  }
  if (token !== state.token) return;
  $("message").textContent = "";
  state.index = i;
  state.vol = vol;
  state.pos = c.peak.slice();
  showCase(c);
  layout();
  renderAll();
  api.currentCase = c.id;
  try { history.replaceState(null, "", "#case=" + encodeURIComponent(c.id)); } catch (e) { }
  if (i + 1 < CASES.length) setTimeout(() => loadVolumes(i + 1).catch(() => {}), 50);
}

// ---------- interaction ----------
function canvasVoxel(name, ev) {
  const v = VIEWS[name], c = CASES[state.index], cv = $("canvas-" + name);
  const rect = cv.getBoundingClientRect();
  const nh = c.shape[v.h], nv = c.shape[v.v];
  const col = Math.floor((ev.clientX - rect.left) / rect.width * nh);
  const row = Math.floor((ev.clientY - rect.top) / rect.height * nv);
  if (col < 0 || col >= nh || row < 0 || row >= nv) return null;
  const p = state.pos.slice();
  p[v.h] = nh - 1 - col; p[v.v] = nv - 1 - row;
  return p;
}
function readout(p) {
  if (!p || !state.vol) { $("readout").textContent = ""; return; }
  const c = CASES[state.index], S = c.shape;
  const idx = (p[0] * S[1] + p[1]) * S[2] + p[2];
  $("readout").textContent = "x " + p[0] + "  y " + p[1] + "  z " + p[2] +
    "   CT " + state.vol.ct[idx] + "/255   CAM " + (state.vol.cam[idx] / 255).toFixed(2) +
    "   " + (state.vol.roi[idx] ? "in ROI" : "outside ROI");
}
for (const name of Object.keys(VIEWS)) {
  const v = VIEWS[name], cv = $("canvas-" + name);
  const pick = (ev) => {
    const p = canvasVoxel(name, ev);
    if (!p) return;
    state.pos = p;
    scheduleRender();
  };
  cv.addEventListener("mousedown", (ev) => { if (state.vol) { pick(ev); ev.preventDefault(); } });
  cv.addEventListener("mousemove", (ev) => {
    if (!state.vol) return;
    if (ev.buttons & 1) pick(ev);
    readout(canvasVoxel(name, ev));
  });
  cv.addEventListener("mouseleave", () => readout(null));
  cv.addEventListener("wheel", (ev) => {
    if (!state.vol) return;
    ev.preventDefault();
    const n = CASES[state.index].shape[v.fixed];
    const step = ev.deltaY > 0 ? -1 : ev.deltaY < 0 ? 1 : 0;
    state.pos[v.fixed] = Math.min(n - 1, Math.max(0, state.pos[v.fixed] + step));
    scheduleRender();
  }, {passive: false});
  $("slider-" + name).addEventListener("input", (ev) => {
    if (!state.vol) return;
    state.pos[v.fixed] = Number(ev.target.value);
    renderAll();
  });
}
for (const id of ["toggle-cam", "toggle-roi", "toggle-crosshair"]) {
  $(id).addEventListener("change", renderAll);
}
for (const id of ["opacity", "cam-floor"]) {
  $(id).addEventListener("input", () => { updateAlpha(); renderAll(); });
}
document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  const onRange = t instanceof HTMLInputElement && t.type === "range";
  let step = 0;
  if (ev.key === "j" || (ev.key === "ArrowDown" && !onRange)) step = 1;
  else if (ev.key === "k" || (ev.key === "ArrowUp" && !onRange)) step = -1;
  if (step) {
    ev.preventDefault();
    const next = Math.min(CASES.length - 1, Math.max(0, state.index + step));
    if (next !== state.index) select(next);
    return;
  }
  const toggles = {c: "toggle-cam", r: "toggle-roi", x: "toggle-crosshair"};
  if (toggles[ev.key]) {
    const box = $(toggles[ev.key]);
    box.checked = !box.checked;
    renderAll();
  }
});
let resizeFrame = 0;
window.addEventListener("resize", () => {
  if (resizeFrame) return;
  resizeFrame = requestAnimationFrame(() => { resizeFrame = 0; layout(); renderAll(); });
});

// ---------- start ----------
buildMeta();
buildList();
updateAlpha();
if (!CASES.length) {
  $("message").textContent = "No cases to show.";
  readyResolve(true);
} else if (typeof DecompressionStream === "undefined") {
  $("message").textContent = "This browser cannot decompress the embedded volumes " +
    "(DecompressionStream is missing): open the page in a current Chrome, Edge, Firefox " +
    "or Safari.";
  readyResolve(false);
} else {
  let first = 0;
  const m = /^#case=(.*)$/.exec(location.hash);
  if (m) {
    const j = CASES.findIndex((c) => c.id === decodeURIComponent(m[1]));
    if (j >= 0) first = j;
  }
  select(first).then(
    () => readyResolve(true),
    (err) => { console.error(err); readyResolve(false); });
}
})();
