(function () {
"use strict";
const DATA = JSON.parse(document.getElementById("radflow-data").textContent);
const CASES = DATA.cases;
const GROUP_NAMES = {TP: "True positive", FP: "False positive", FN: "False negative",
  TN: "True negative", positive: "Predicted positive (no label)",
  negative: "Predicted negative (no label)", unlabelled: "Unlabelled"};
const GROUP_COLOURS = {TP: "var(--tp)", FP: "var(--fp)", FN: "var(--fn)", TN: "var(--tn)",
  positive: "var(--fp)", negative: "var(--tn)", unlabelled: "var(--unlabelled)"};
// A slider moves the slice of one plane: the RAS+ voxel axis that the plane holds fixed.
const PLANES = {axial: {axis: 2, name: "z"}, coronal: {axis: 1, name: "y"},
  sagittal: {axis: 0, name: "x"}};
// Outline colours of the label layers: label 0 nothing, label 1 the colour (interior clear).
const OUTLINE = {roi: [255, 79, 216], lesion: [255, 255, 255]};
const CACHE_MAX = 6;  // cases whose data scripts stay decoded in memory
const $ = (id) => document.getElementById(id);
const state = {index: -1, token: 0, layers: null, vox: [0, 0, 0]};
let readyResolve;
const api = {
  ready: new Promise((resolve) => { readyResolve = resolve; }),
  currentCase: null,
  renderCount: 0,
  state: state,
  nv: null,
  // ms since navigation: this script started (NiiVue parsed), WebGL ready, first case drawn,
  // and the case list drawn (the page usable)
  timings: {script: performance.now(), list: null, webgl: null, first: null},
  select: (caseId) => select(CASES.findIndex((c) => c.id === caseId)),
};
window.radflowViewer = api;

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

// ---------- header, triage filter, list ----------
function buildMeta() {
  const box = $("meta");
  for (const [k, v] of Object.entries(DATA.meta || {})) {
    const s = el("span", null, k + ": ");
    s.appendChild(el("b", null, fmt(v)));
    box.appendChild(s);
  }
}
const counts = {};
for (const c of CASES) counts[c.group] = (counts[c.group] || 0) + 1;
const shownGroups = new Set(DATA.groups);
function buildTriage() {
  const box = $("triage");
  for (const g of DATA.groups) {
    if (!counts[g]) continue;
    const lab = el("label");
    lab.title = GROUP_NAMES[g];
    const box1 = el("input");
    box1.type = "checkbox";
    box1.checked = true;
    box1.dataset.group = g;
    box1.addEventListener("change", () => {
      if (box1.checked) shownGroups.add(g); else shownGroups.delete(g);
      applyFilter();
    });
    const dot = el("span", "dot");
    dot.style.background = GROUP_COLOURS[g];
    lab.append(box1, dot, el("span", null, g + " " + counts[g]));
    box.appendChild(lab);
  }
}
function buildList() {
  const list = $("case-list");
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
    item.dataset.group = c.group;
    item.title = c.id;
    item.appendChild(el("span", "cid", c.id));
    item.appendChild(el("span", "prob", "p " + Number(c.probability).toFixed(3)));
    item.appendChild(el("span", "lab", c.label === null ? "\u2014" : "y=" + c.label));
    item.addEventListener("click", () => select(i).catch(() => {}));
    list.appendChild(item);
  });
}
const visible = (i) => shownGroups.has(CASES[i].group);
function applyFilter() {
  document.querySelectorAll("#case-list [data-group]").forEach((e) => {
    e.classList.toggle("hidden", !shownGroups.has(e.dataset.group));
  });
  $("case-count").textContent = "(" + CASES.filter((c) => shownGroups.has(c.group)).length +
    " of " + CASES.length + ")";
  if (state.index >= 0 && !visible(state.index)) {
    const next = CASES.findIndex((c, i) => visible(i));
    if (next >= 0) select(next).catch(() => {});
  }
}

// ---------- per-case data: one classic script per case, loaded when first shown ----------
const loaded = new Map();  // index -> {id, ct, cam, roi, lesion} (gzipped NIfTI, base64)
const pending = new Map();  // index -> {promise, resolve, reject}
window.radflowCase = function (i, payload) {
  const wait = pending.get(i);
  if (!wait) return;
  pending.delete(i);
  if (!payload || payload.id !== CASES[i].id) {
    wait.reject(new Error(CASES[i].file + " holds the data of another case"));
    return;
  }
  loaded.set(i, payload);
  while (loaded.size > CACHE_MAX) loaded.delete(loaded.keys().next().value);
  wait.resolve(payload);
};
function caseData(i) {
  if (loaded.has(i)) {
    const d = loaded.get(i);
    loaded.delete(i); loaded.set(i, d);
    return Promise.resolve(d);
  }
  if (pending.has(i)) return pending.get(i).promise;
  const wait = {};
  wait.promise = new Promise((resolve, reject) => { wait.resolve = resolve; wait.reject = reject; });
  pending.set(i, wait);
  const s = document.createElement("script");
  s.src = CASES[i].file;
  s.onload = () => {
    s.remove();
    if (pending.get(i) === wait) {
      pending.delete(i);
      wait.reject(new Error(CASES[i].file + " did not hold case data"));
    }
  };
  s.onerror = () => {
    s.remove();
    pending.delete(i);
    wait.reject(new Error("cannot read " + CASES[i].file + " (it belongs beside this page)"));
  };
  document.head.appendChild(s);
  return wait.promise;
}

// ---------- NiiVue ----------
const NV = window.niivue;
let nv = null;
function camFloor() { return $("cam-floor").value / 100; }
function camOpacity() { return $("opacity").value / 100; }
async function startNiivue() {
  nv = new NV.Niivue({
    backColor: [0, 0, 0, 1],
    isRadiologicalConvention: true,  // patient's right on screen left
    sagittalNoseLeft: true,  // anterior on screen left, as the PNGs and most PACS
    multiplanarShowRender: NV.SHOW_RENDER.NEVER,
    multiplanarLayout: NV.MULTIPLANAR_TYPE.ROW,
    crosshairColor: [1, 0.84, 0.04, 0.8],
    crosshairWidth: 0.5,
    crosshairWidthUnit: "percent",
    isColorbar: true,
    show3Dcrosshair: false,
    dragAndDropEnabled: false,
    loadingText: "",
    logLevel: "error",
  });
  await nv.attachToCanvas($("gl"));
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.setAtlasOutline(1);
  nv.onLocationChange = (loc) => locationChanged(loc);
  api.nv = nv;
  api.timings.webgl = performance.now();
}
async function layersOf(i, d) {
  const c = CASES[i];
  const load = (base64, name, extra) =>
    NV.NVImage.loadFromBase64(Object.assign({base64: base64, name: name}, extra));
  const ct = await load(d.ct, "ct.nii.gz", {colormap: "gray", cal_min: c.window[0],
    cal_max: c.window[1], colorbarVisible: false});
  const cam = await load(d.cam, "cam.nii.gz", {colormap: "jet", opacity: camOpacity(),
    cal_min: camFloor(), cal_max: 1, colorbarVisible: true});
  const outline = async (b64, name, rgb) => {
    if (!b64) return null;
    const v = await load(b64, name, {colorbarVisible: false});
    v.setColormapLabel({R: [0, rgb[0]], G: [0, rgb[1]], B: [0, rgb[2]], A: [0, 0], I: [0, 1]});
    return v;
  };
  return {ct: ct, cam: cam, roi: await outline(d.roi, "roi.nii.gz", OUTLINE.roi),
    lesion: await outline(d.lesion, "lesion.nii.gz", OUTLINE.lesion)};
}
// The volumes NiiVue shows: the CT, then each layer that is switched on.
function wantedVolumes() {
  const L = state.layers;
  const out = [L.ct];
  if ($("toggle-cam").checked) out.push(L.cam);
  if ($("toggle-roi").checked && L.roi) out.push(L.roi);
  if ($("toggle-lesion").checked && L.lesion) out.push(L.lesion);
  return out;
}
// Set NiiVue's volume list at once (NiiVue's addVolume / removeVolume upload all volumes again
// on each call: four times per case switch).
function syncVolumes() {
  if (!state.layers) return;
  const want = wantedVolumes();
  nv.volumes = want;
  nv.back = want[0];
  nv.overlays = want.slice(1);
}
function redraw() {
  if (!state.layers) return;
  state.layers.cam.cal_min = camFloor();
  state.layers.cam.opacity = camOpacity();
  syncVolumes();
  nv.setCrosshairWidth($("toggle-crosshair").checked ? 0.5 : 0);
  nv.updateGLVolume();
  api.renderCount += 1;
}
function moveTo(vox) {
  const c = CASES[state.index];
  const v = vox.map((x, a) => Math.min(c.shape[a] - 1, Math.max(0, Math.round(x))));
  nv.scene.crosshairPos = nv.vox2frac(v);
  nv.drawScene();
  nv.createOnLocationChange();
}
function locationChanged(loc) {
  if (state.index < 0 || !loc || !loc.vox) return;
  const c = CASES[state.index];
  state.vox = Array.from(loc.vox, (x) => Math.round(x));
  for (const [name, p] of Object.entries(PLANES)) {
    const s = state.vox[p.axis];
    $("slider-" + name).value = String(s);
    $("label-" + name).textContent = p.name + " " + s + " / " + (c.shape[p.axis] - 1) +
      " \u00b7 " + (s * c.spacing[p.axis]).toFixed(1) + " mm";
  }
  const L = state.layers, vals = {};
  for (const [k, v] of Object.entries(L || {})) {
    if (!v) continue;
    const at = loc.values ? loc.values.find((x) => x.name === v.name) : null;
    vals[k] = at ? at.value : null;
  }
  let text = "x " + state.vox[0] + "  y " + state.vox[1] + "  z " + state.vox[2];
  if (vals.ct !== null && vals.ct !== undefined) text += "   CT " + Math.round(vals.ct) + " HU";
  if (vals.cam !== null && vals.cam !== undefined) text += "   CAM " + vals.cam.toFixed(2);
  if (vals.roi !== null && vals.roi !== undefined) text += vals.roi ? "   in ROI" : "   outside ROI";
  if (vals.lesion) text += "   in lesion";
  $("readout").textContent = text;
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
    ["CT window HU", c.window.map((s) => fmt(s)).join(" \u2026 ")],
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
  for (const [name, p] of Object.entries(PLANES)) $("slider-" + name).max = String(c.shape[p.axis] - 1);
  $("toggle-lesion").disabled = !c.lesion;
  $("lesion-control").classList.toggle("absent", !c.lesion);
  $("lesion-control").title = c.lesion ? "reference lesion mask" : "no lesion mask for this case";
}

async function select(i) {
  if (i < 0 || i >= CASES.length) return;
  const token = ++state.token;
  const c = CASES[i];
  document.querySelectorAll(".case-item.selected").forEach((e) => e.classList.remove("selected"));
  const item = document.querySelector('.case-item[data-index="' + i + '"]');
  item.classList.add("selected");
  item.scrollIntoView({block: "nearest"});
  let layers;
  try {
    layers = await layersOf(i, await caseData(i));
  } catch (err) {
    if (token === state.token) $("message").textContent = "Cannot show case " + c.id + ": " + err.message;
    throw err;
  }
  if (token !== state.token) return;
  $("message").textContent = "";
  state.index = i;
  state.layers = layers;
  showCase(c);
  redraw();
  moveTo(c.peak);
  api.currentCase = c.id;
  try { history.replaceState(null, "", "#case=" + encodeURIComponent(c.id)); } catch (e) { }
  const next = nextVisible(i, 1);
  if (next !== i) setTimeout(() => caseData(next).catch(() => {}), 50);
}
function nextVisible(i, step) {
  for (let j = i + step; j >= 0 && j < CASES.length; j += step) if (visible(j)) return j;
  return i;
}

// ---------- interaction ----------
for (const [name, p] of Object.entries(PLANES)) {
  $("slider-" + name).addEventListener("input", (ev) => {
    if (!state.layers) return;
    const v = state.vox.slice();
    v[p.axis] = Number(ev.target.value);
    moveTo(v);
  });
}
for (const id of ["toggle-cam", "toggle-roi", "toggle-lesion", "toggle-crosshair"]) {
  $(id).addEventListener("change", redraw);
}
for (const id of ["opacity", "cam-floor"]) $(id).addEventListener("input", redraw);
document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  const onRange = t instanceof HTMLInputElement && t.type === "range";
  let step = 0;
  if (ev.key === "j" || (ev.key === "ArrowDown" && !onRange)) step = 1;
  else if (ev.key === "k" || (ev.key === "ArrowUp" && !onRange)) step = -1;
  if (step) {
    ev.preventDefault();
    const next = nextVisible(state.index, step);
    if (next !== state.index) select(next).catch(() => {});
    return;
  }
  const toggles = {c: "toggle-cam", r: "toggle-roi", l: "toggle-lesion", x: "toggle-crosshair"};
  if (toggles[ev.key] && !$(toggles[ev.key]).disabled) {
    const box = $(toggles[ev.key]);
    box.checked = !box.checked;
    redraw();
  }
});

// ---------- start ----------
buildMeta();
buildTriage();
buildList();
applyFilter();
api.timings.list = performance.now();
if (!CASES.length) {
  $("message").textContent = "No cases to show.";
  readyResolve(true);
} else if (!NV) {
  $("message").textContent = "NiiVue (niivue.umd.js) did not load: keep it beside this page.";
  readyResolve(false);
} else {
  let first = 0;
  const m = /^#case=(.*)$/.exec(location.hash);
  if (m) {
    const j = CASES.findIndex((c) => c.id === decodeURIComponent(m[1]));
    if (j >= 0) first = j;
  }
  // The case list is drawn first; WebGL (shader compilation) starts after that paint.
  const start = () => startNiivue().then(() => select(first));
  new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0))).then(start).then(
    () => { api.timings.first = performance.now(); readyResolve(true); },
    (err) => { console.error(err); $("message").textContent = String(err.message || err);
      readyResolve(false); });
}
})();
