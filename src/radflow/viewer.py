"""Grad-CAM review viewer: one self-contained, offline HTML page for a radiologist.

``write_viewer(cases, out_html)`` writes a single file that opens from a ``file://`` URL with no
network and no other file: a case list grouped by outcome (TP, FP, FN, TN, unlabelled; most
confident first), and for the chosen case axial, coronal and sagittal views of the windowed CT
with the Grad-CAM overlay and the ROI outline, in radiological convention (patient's right on
screen left) with the physical aspect ratio from the voxel spacing.

Each case's three volumes are stored as one gzip stream in base64, in a ``<script>`` element of
their own, and decoded with the browser's ``DecompressionStream`` only when the case is first
shown, so a page with hundreds of small cases stays a few megabytes and opens at once.

Volumes are RAS+ voxel arrays of shape (X, Y, Z): axis 0 increases toward the patient's right,
axis 1 toward anterior, axis 2 toward superior.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radflow.io import atomic_path

GROUPS = ("TP", "FP", "FN", "TN", "unlabelled")
GZIP_LEVEL = 6  # on noisy 64³ CT + CAM + ROI, level 9 saves < 1 % at twice the time


@dataclass
class ViewerCase:
    """One case of the review page: outcome, numbers and three (X, Y, Z) uint8 volumes (RAS+)."""

    case_id: str
    group: str  # "TP", "FP", "FN", "TN" or "unlabelled"
    probability: float
    prediction: int
    label: int | None
    split: str
    threshold: float
    numbers: dict[str, float | int | str]  # extra numbers shown with the case
    ct: np.ndarray  # uint8 (X, Y, Z), windowed to 0..255
    cam: np.ndarray  # uint8 (X, Y, Z), CAM normalised per case to 0..255
    roi: np.ndarray  # bool or integer (X, Y, Z) organ mask
    spacing: tuple[float, float, float]  # mm along X, Y, Z
    peak: tuple[int, int, int]  # voxel index of the CAM peak: the slices shown first


def confidence(case: ViewerCase) -> float:
    """Confidence in the prediction made: p for a predicted positive, 1 - p for a negative."""
    p = float(case.probability)
    return p if int(case.prediction) == 1 else 1.0 - p


def order_cases(cases: Sequence[ViewerCase]) -> list[ViewerCase]:
    """Cases in display order: by group (TP, FP, FN, TN, unlabelled), most confident first."""
    return sorted(cases, key=lambda c: (GROUPS.index(c.group), -confidence(c), c.case_id))


def write_viewer(
    cases: list[ViewerCase],
    out_html: Path,
    title: str = "radflow Grad-CAM review",
    meta: dict | None = None,
) -> None:
    """Write the self-contained Grad-CAM review page for ``cases`` to ``out_html`` atomically.

    ``meta`` (model name, metrics, ...) is shown in the page header. Raises ``ValueError`` for an
    unknown group, a duplicate case id, volumes of different shapes or a peak outside them.
    """
    _check_unique([c.case_id for c in cases])
    ordered = order_cases([_checked(c) for c in cases])
    records = [_record(i, c) for i, c in enumerate(ordered)]
    data = {"cases": records, "meta": _jsonable(meta or {}), "groups": list(GROUPS)}
    head = _PAGE_HEAD.replace("__TITLE__", html.escape(title))
    with atomic_path(out_html) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(head)
        fh.write('<script type="application/json" id="radflow-data">')
        fh.write(_script_json(data))
        fh.write("</script>\n")
        for i, case in enumerate(ordered):
            fh.write(f'<script type="application/octet-stream" id="vol-{i}">')
            fh.write(_encode_volumes(case))
            fh.write("</script>\n")
        fh.write("<script>\n")
        fh.write(_SCRIPT)
        fh.write("</script>\n</body>\n</html>\n")


def _check_unique(ids: list[str]) -> None:
    seen: set[str] = set()
    for case_id in ids:
        if case_id in seen:
            raise ValueError(f"duplicate case id in viewer: {case_id!r}")
        seen.add(case_id)


def _checked(case: ViewerCase) -> ViewerCase:
    """Validate one case; return it unchanged."""
    where = f"viewer case {case.case_id!r}"
    if case.group not in GROUPS:
        raise ValueError(f"{where}: group {case.group!r} is not one of {GROUPS}")
    shape = np.shape(case.ct)
    if len(shape) != 3 or np.shape(case.cam) != shape or np.shape(case.roi) != shape:
        raise ValueError(
            f"{where}: ct, cam and roi must be 3D of one shape, got "
            f"{np.shape(case.ct)}, {np.shape(case.cam)}, {np.shape(case.roi)}"
        )
    for name in ("ct", "cam"):
        dtype = np.asarray(getattr(case, name)).dtype
        if dtype != np.uint8:
            raise ValueError(f"{where}: {name} must be uint8 (0..255), got {dtype}")
    if len(case.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in case.spacing):
        raise ValueError(f"{where}: spacing must be three positive mm values: {case.spacing}")
    peak = tuple(int(p) for p in case.peak)
    if len(peak) != 3 or not all(0 <= p < n for p, n in zip(peak, shape, strict=True)):
        raise ValueError(f"{where}: peak {case.peak} lies outside the volume {shape}")
    return case


def _record(index: int, case: ViewerCase) -> dict[str, Any]:
    """The JSON description of a case (its volumes go in script element ``vol-<index>``)."""
    return {
        "index": index,
        "id": str(case.case_id),
        "group": case.group,
        "probability": _jsonable(float(case.probability)),
        "confidence": _jsonable(confidence(case)),
        "prediction": int(case.prediction),
        "label": None if case.label is None else int(case.label),
        "split": str(case.split),
        "threshold": _jsonable(float(case.threshold)),
        "numbers": _jsonable(dict(case.numbers)),
        "shape": [int(n) for n in np.shape(case.ct)],
        "spacing": [float(s) for s in case.spacing],
        "peak": [int(p) for p in case.peak],
    }


def _encode_volumes(case: ViewerCase) -> str:
    """CT, CAM and ROI (0/1), each uint8 in C order of (X, Y, Z), concatenated, gzip, base64."""
    ct = np.ascontiguousarray(case.ct, dtype=np.uint8)
    cam = np.ascontiguousarray(case.cam, dtype=np.uint8)
    roi = np.ascontiguousarray(np.asarray(case.roi) != 0, dtype=np.uint8)
    raw = ct.tobytes() + cam.tobytes() + roi.tobytes()
    packed = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
    return base64.b64encode(packed).decode("ascii")


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, non-finite floats as text, rest as text."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _script_json(obj: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' can end or open a tag."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_PAGE_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>__TITLE__</title>
<style>
:root {
  --bg: #0e0f11; --panel: #17191c; --panel2: #1f2226; --line: #2b2f35;
  --text: #d8dce2; --dim: #8a919b; --accent: #4fb3ff;
  --tp: #3ecf7a; --fp: #ff9f3a; --fn: #ff5c7a; --tn: #7d9cc0; --unlabelled: #9a9a9a;
}
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; background: var(--bg); color: var(--text);
  font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
#app { display: flex; height: 100vh; }
#sidebar { width: 270px; flex: none; display: flex; flex-direction: column;
  background: var(--panel); border-right: 1px solid var(--line); }
#sidebar-head { padding: 12px 14px 8px; font-weight: 600; letter-spacing: .02em; }
#sidebar-head .dim { font-weight: 400; }
#case-list { flex: 1; overflow-y: auto; outline: none; padding-bottom: 8px; }
.group-head { position: sticky; top: 0; z-index: 1; display: flex; align-items: center;
  gap: 8px; padding: 7px 14px; background: var(--panel2); border-top: 1px solid var(--line);
  border-bottom: 1px solid var(--line); font-size: 12px; font-weight: 600;
  text-transform: uppercase; letter-spacing: .05em; }
.group-head .count { margin-left: auto; color: var(--dim); font-weight: 400; }
.dot { width: 9px; height: 9px; border-radius: 50%; flex: none; }
.case-item { display: grid; grid-template-columns: 1fr auto auto; gap: 10px;
  padding: 5px 14px 5px 12px; border-left: 3px solid transparent; cursor: pointer;
  font-variant-numeric: tabular-nums; }
.case-item:hover { background: #20242a; }
.case-item.selected { background: #22303f; border-left-color: var(--accent); }
.case-item .cid { overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
  font-family: ui-monospace, "SF Mono", Menlo, Consolas, monospace; font-size: 12px; }
.case-item .prob, .case-item .lab { color: var(--dim); font-size: 12px; }
.case-item.selected .prob, .case-item.selected .lab { color: var(--text); }
#help { padding: 8px 14px; border-top: 1px solid var(--line); color: var(--dim);
  font-size: 11px; }
kbd { font: 11px ui-monospace, Menlo, Consolas, monospace; padding: 0 4px;
  border: 1px solid var(--line); border-radius: 3px; background: var(--panel2); }
#main { flex: 1; min-width: 0; overflow: auto; scrollbar-gutter: stable;
  padding: 12px 18px 18px; }
#header { display: flex; align-items: baseline; flex-wrap: wrap; gap: 6px 18px;
  padding-bottom: 10px; border-bottom: 1px solid var(--line); }
#header h1 { margin: 0; font-size: 16px; font-weight: 600; }
#meta { display: flex; flex-wrap: wrap; gap: 4px 14px; color: var(--dim); font-size: 12px; }
#meta b { color: var(--text); font-weight: 500; }
#case-head { display: flex; align-items: center; flex-wrap: wrap; gap: 8px 14px;
  margin: 12px 0 8px; }
#case-title { font: 600 15px ui-monospace, "SF Mono", Menlo, Consolas, monospace; }
#case-group { color: var(--dim); }
.badge { padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
  color: #0e0f11; }
#toolbar { display: flex; align-items: center; flex-wrap: wrap; gap: 8px 20px;
  padding: 8px 12px; margin-bottom: 10px; background: var(--panel);
  border: 1px solid var(--line); border-radius: 6px; }
#toolbar label { display: inline-flex; align-items: center; gap: 6px; cursor: pointer;
  user-select: none; }
#toolbar input[type=range] { width: 110px; }
#colorbar-wrap { display: inline-flex; align-items: center; gap: 6px; color: var(--dim);
  font-size: 11px; }
#colorbar { width: 150px; height: 10px; border: 1px solid var(--line); border-radius: 2px; }
input[type=range] { accent-color: var(--accent); }
input[type=checkbox] { accent-color: var(--accent); }
#views { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.view { margin: 0; padding: 8px; background: #000; border: 1px solid var(--line);
  border-radius: 6px; }
.view figcaption { display: flex; justify-content: space-between; gap: 10px;
  margin-bottom: 6px; font-size: 12px; }
.view figcaption .name { font-weight: 600; letter-spacing: .04em; text-transform: uppercase; }
.view figcaption .slice-label { color: var(--dim); font-variant-numeric: tabular-nums; }
.canvas-wrap { position: relative; line-height: 0; }
.canvas-wrap canvas { display: block; cursor: crosshair; image-rendering: pixelated; }
.ori { position: absolute; color: #e8c547; font: 600 12px system-ui, sans-serif;
  line-height: 1; text-shadow: 0 0 3px #000, 0 0 2px #000; pointer-events: none; }
.ori-l { left: 4px; top: 50%; transform: translateY(-50%); }
.ori-r { right: 4px; top: 50%; transform: translateY(-50%); }
.ori-t { top: 4px; left: 50%; transform: translateX(-50%); }
.ori-b { bottom: 4px; left: 50%; transform: translateX(-50%); }
.view input[type=range] { display: block; width: 100%; margin: 8px 0 0; }
#readout { min-height: 18px; margin-top: 8px; color: var(--dim);
  font: 12px ui-monospace, Menlo, Consolas, monospace; }
#numbers { display: flex; flex-wrap: wrap; gap: 6px; margin: 0 0 10px; }
#numbers .num { display: flex; gap: 6px; padding: 3px 9px; background: var(--panel);
  border: 1px solid var(--line); border-radius: 4px; }
#numbers dt { color: var(--dim); }
#numbers dd { margin: 0; font: 12px/1.5 ui-monospace, Menlo, Consolas, monospace;
  font-variant-numeric: tabular-nums; }
#numbers .num.extra { border-color: #35506b; }
#message { color: var(--fn); margin: 8px 0; }
#message:empty { display: none; }
</style>
</head>
<body>
<div id="app">
  <aside id="sidebar">
    <div id="sidebar-head">Cases <span class="dim" id="case-count"></span></div>
    <div id="case-list" tabindex="0" aria-label="cases"></div>
    <div id="help"><kbd>&uarr;</kbd><kbd>&darr;</kbd> or <kbd>j</kbd><kbd>k</kbd> case &middot;
      <kbd>c</kbd> CAM &middot; <kbd>r</kbd> ROI &middot; <kbd>x</kbd> crosshair &middot;
      wheel: slice &middot; click: cross-reference</div>
  </aside>
  <main id="main">
    <header id="header"><h1>__TITLE__</h1><div id="meta"></div></header>
    <div id="message"></div>
    <section id="case-head">
      <span id="case-title"></span><span id="case-badge" class="badge"></span>
      <span id="case-group"></span>
    </section>
    <dl id="numbers"></dl>
    <section id="toolbar">
      <label><input type="checkbox" id="toggle-cam" checked> CAM overlay</label>
      <label>opacity <input type="range" id="opacity" min="0" max="100" value="50"></label>
      <label title="CAM values below this are not drawn">hide below
        <input type="range" id="cam-floor" min="0" max="95" value="20"></label>
      <span id="colorbar-wrap">0 <canvas id="colorbar" width="150" height="10"></canvas> 1
        <span>(CAM, per case)</span></span>
      <label><input type="checkbox" id="toggle-roi" checked> ROI outline</label>
      <label><input type="checkbox" id="toggle-crosshair" checked> crosshair</label>
    </section>
    <section id="views">
      <figure class="view" id="view-axial">
        <figcaption><span class="name">Axial</span>
          <span class="slice-label" id="label-axial"></span></figcaption>
        <div class="canvas-wrap"><canvas id="canvas-axial"></canvas>
          <span class="ori ori-l">R</span><span class="ori ori-r">L</span>
          <span class="ori ori-t">A</span><span class="ori ori-b">P</span></div>
        <input type="range" id="slider-axial" min="0" max="0" value="0" aria-label="axial slice">
      </figure>
      <figure class="view" id="view-coronal">
        <figcaption><span class="name">Coronal</span>
          <span class="slice-label" id="label-coronal"></span></figcaption>
        <div class="canvas-wrap"><canvas id="canvas-coronal"></canvas>
          <span class="ori ori-l">R</span><span class="ori ori-r">L</span>
          <span class="ori ori-t">S</span><span class="ori ori-b">I</span></div>
        <input type="range" id="slider-coronal" min="0" max="0" value="0"
          aria-label="coronal slice">
      </figure>
      <figure class="view" id="view-sagittal">
        <figcaption><span class="name">Sagittal</span>
          <span class="slice-label" id="label-sagittal"></span></figcaption>
        <div class="canvas-wrap"><canvas id="canvas-sagittal"></canvas>
          <span class="ori ori-l">A</span><span class="ori ori-r">P</span>
          <span class="ori ori-t">S</span><span class="ori ori-b">I</span></div>
        <input type="range" id="slider-sagittal" min="0" max="0" value="0"
          aria-label="sagittal slice">
      </figure>
    </section>
    <div id="readout"></div>
  </main>
</div>
"""

_SCRIPT = r"""(function () {
"use strict";
const DATA = JSON.parse(document.getElementById("radflow-data").textContent);
const CASES = DATA.cases;
const GROUP_NAMES = {TP: "True positive", FP: "False positive", FN: "False negative",
  TN: "True negative", unlabelled: "Unlabelled"};
const GROUP_COLOURS = {TP: "var(--tp)", FP: "var(--fp)", FN: "var(--fn)", TN: "var(--tn)",
  unlabelled: "var(--unlabelled)"};
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
"""
