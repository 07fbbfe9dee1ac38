"""Grad-CAM review viewer: an offline HTML page over the CT, drawn with NiiVue (WebGL).

``write_viewer(cases, out_html)`` writes, in the folder of ``out_html``:

* ``out_html``: the page -- a case list grouped by outcome (TP, FP, FN, TN, unlabelled; most
  confident first) with a triage filter, and for the chosen case NiiVue's axial, coronal and
  sagittal views of the CT at its own resolution in radiological convention, the CAM overlay
  (toggle, opacity, threshold), the ROI outline and, where known, the lesion outline;
* ``niivue.umd.js``: NiiVue, vendored in this package (``NIIVUE_VERSION``, pinned by
  ``web/package.json``; ``make niivue`` refreshes it);
* ``review/case-NNNN.js``: one script per case holding its volumes as gzipped NIfTI-1 in base64,
  loaded with a ``<script>`` element only when the case is first shown, so a page of hundreds of
  cases opens at once.

Everything is a classic script referenced by a relative path and every volume is inline data,
so the page opens from a ``file://`` URL with no network and no server (Chromium blocks ES
modules and ``fetch()`` of local files there; it does not block classic scripts).

Volumes are RAS+ voxel arrays of shape (X, Y, Z) on one ``affine``; the NIfTI files written for
the page carry only that geometry and the voxels (a fresh header: no description, no file name).

The page template is three files of this package, read with ``importlib.resources``:
``page.html`` (markup with ``{{name}}`` placeholders, see ``PLACEHOLDERS``), ``review.css`` and
``review.js`` (inlined when a page is written).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from radflow.io import atomic_path
from radflow.viewer.encode import nifti_base64

# positive / negative: predicted, without a label (a predict cohort without labels)
GROUPS = ("TP", "FP", "FN", "TN", "positive", "negative", "unlabelled")
NIIVUE_JS = "niivue.umd.js"  # beside the page; the vendored NiiVue UMD build
NIIVUE_VERSION = "0.69.0"  # = web/package.json (a test checks both and the file)
CASE_DIR = "review"  # per-case data scripts, beside the page
_CASE_FILE = re.compile(r"case-\d{4,}\.js")

# The placeholders of page.html, each used once. A block placeholder stands alone on its line and
# that whole line is replaced by text ending in a newline; the others are inline.
INLINE_PLACEHOLDERS = ("title", "heading", "data", "niivue")  # niivue: the script's file name
BLOCK_PLACEHOLDERS = ("styles", "script")  # review.css, review.js
PLACEHOLDERS = INLINE_PLACEHOLDERS + BLOCK_PLACEHOLDERS
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class ViewerCase:
    """One case of the review page: outcome, numbers and its volumes on the CT's grid (RAS+)."""

    case_id: str
    group: str  # "TP", "FP", "FN", "TN" or "unlabelled"
    probability: float
    prediction: int
    label: int | None
    split: str
    threshold: float
    numbers: dict[str, float | int | str]  # extra numbers shown with the case
    ct: np.ndarray  # (X, Y, Z) HU, integer
    cam: np.ndarray  # (X, Y, Z) CAM in [0, 1] (stored to 1/255)
    roi: np.ndarray  # (X, Y, Z) organ mask (bool or integer)
    affine: np.ndarray  # 4x4 voxel -> world (mm, RAS+) of all the volumes
    window: tuple[float, float]  # HU shown black .. white
    peak: tuple[int, int, int]  # voxel index of the CAM peak: the slices shown first
    lesion: np.ndarray | None = None  # (X, Y, Z) reference lesion mask, where known


def confidence(case: ViewerCase) -> float:
    """Confidence in the prediction made: p for a predicted positive, 1 - p for a negative."""
    p = float(case.probability)
    return p if int(case.prediction) == 1 else 1.0 - p


def order_cases(cases: Sequence[ViewerCase]) -> list[ViewerCase]:
    """Cases in display order: by group (``GROUPS``), most confident first."""
    return sorted(cases, key=lambda c: (GROUPS.index(c.group), -confidence(c), c.case_id))


def case_file(index: int) -> str:
    """The data script of the case at ``index`` of the page, relative to the page."""
    return f"{CASE_DIR}/case-{index:04d}.js"


def write_viewer(
    cases: list[ViewerCase],
    out_html: Path,
    title: str = "radflow Grad-CAM review",
    meta: dict | None = None,
) -> None:
    """Write the Grad-CAM review page for ``cases`` to ``out_html`` with its scripts beside it.

    Each file is written atomically; data scripts of an earlier page that this one does not use
    are removed. ``meta`` (model name, metrics, ...) is shown in the page header. Raises
    ``ValueError`` for an unknown group, a duplicate case id, volumes of different shapes, a bad
    affine or window, or a peak outside the volume.
    """
    out_html = Path(out_html)
    _check_unique([c.case_id for c in cases])
    ordered = order_cases([_checked(c) for c in cases])
    folder = out_html.parent
    written = set()
    for i, case in enumerate(ordered):
        path = folder / case_file(i)
        with atomic_path(path) as tmp:
            tmp.write_text(_case_script(i, case), encoding="ascii")
        written.add(path.name)
    stale = folder / CASE_DIR
    if stale.is_dir():
        for p in stale.iterdir():
            if _CASE_FILE.fullmatch(p.name) and p.name not in written:
                p.unlink()
    with resources.as_file(resources.files(__name__).joinpath(NIIVUE_JS)) as src:
        with atomic_path(folder / NIIVUE_JS) as tmp:
            shutil.copyfile(src, tmp)
    data = {
        "cases": [_record(i, c) for i, c in enumerate(ordered)],
        "meta": _jsonable(meta or {}),
        "groups": list(GROUPS),
    }
    fill = {
        "title": html.escape(title),
        "heading": html.escape(title),
        "data": _script_json(data),
        "niivue": NIIVUE_JS,
        "styles": _asset("review.css"),
        "script": _asset("review.js"),
    }
    parts = _page_parts()
    text = "".join(part if k % 2 == 0 else fill[part] for k, part in enumerate(parts))
    with atomic_path(out_html) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _asset(name: str) -> str:
    """The text of ``name``, a file of this package, ending in a newline."""
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return text if text.endswith("\n") else text + "\n"


def _page_parts() -> list[str]:
    """page.html split at its placeholders: text, name, text, ..., name, text.

    A block placeholder's line goes with it: the text around it loses that line's newline.
    """
    parts = _PLACEHOLDER.split(_asset("page.html"))
    names = parts[1::2]
    if sorted(names) != sorted(PLACEHOLDERS):
        raise RuntimeError(f"page.html placeholders {names}, expected each of {PLACEHOLDERS} once")
    for i in range(1, len(parts), 2):
        if parts[i] in BLOCK_PLACEHOLDERS:
            if not (parts[i - 1].endswith("\n") and parts[i + 1].startswith("\n")):
                raise RuntimeError(f"page.html: {{{{{parts[i]}}}}} must stand alone on its line")
            parts[i + 1] = parts[i + 1][1:]
    return parts


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
    others = {"cam": case.cam, "roi": case.roi}
    if case.lesion is not None:
        others["lesion"] = case.lesion
    if len(shape) != 3 or any(np.shape(v) != shape for v in others.values()):
        got = ", ".join(f"{k} {np.shape(v)}" for k, v in {"ct": case.ct, **others}.items())
        raise ValueError(f"{where}: ct, cam, roi (and lesion) must be 3D of one shape, got {got}")
    if not np.issubdtype(np.asarray(case.ct).dtype, np.integer):
        raise ValueError(f"{where}: ct must hold integer HU, got {np.asarray(case.ct).dtype}")
    aff = np.asarray(case.affine, dtype=float)
    if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) == 0:
        raise ValueError(f"{where}: affine must be a finite, invertible 4x4 matrix")
    lo, hi = (float(v) for v in case.window)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{where}: window must be two finite HU values, low < high: {case.window}")
    peak = tuple(int(p) for p in case.peak)
    if len(peak) != 3 or not all(0 <= p < n for p, n in zip(peak, shape, strict=True)):
        raise ValueError(f"{where}: peak {case.peak} lies outside the volume {shape}")
    return case


def _record(index: int, case: ViewerCase) -> dict[str, Any]:
    """The JSON description of a case (its volumes are in ``case_file(index)``)."""
    aff = np.asarray(case.affine, dtype=float)
    return {
        "index": index,
        "id": str(case.case_id),
        "file": case_file(index),
        "group": case.group,
        "probability": _jsonable(float(case.probability)),
        "confidence": _jsonable(confidence(case)),
        "prediction": int(case.prediction),
        "label": None if case.label is None else int(case.label),
        "split": str(case.split),
        "threshold": _jsonable(float(case.threshold)),
        "numbers": _jsonable(dict(case.numbers)),
        "shape": [int(n) for n in np.shape(case.ct)],
        "spacing": [round(float(s), 4) for s in np.linalg.norm(aff[:3, :3], axis=0)],
        "window": [float(v) for v in case.window],
        "peak": [int(p) for p in case.peak],
        "lesion": case.lesion is not None,
    }


def _case_script(index: int, case: ViewerCase) -> str:
    """The data script of one case: ``radflowCase(index, {id, ct, cam, roi, lesion})``."""
    aff = np.asarray(case.affine, dtype=float)
    vols = {
        "id": str(case.case_id),
        "ct": nifti_base64(np.asarray(case.ct), aff, kind="ct"),
        "cam": nifti_base64(np.asarray(case.cam), aff, kind="cam"),
        "roi": nifti_base64(np.asarray(case.roi), aff, kind="label"),
        "lesion": None
        if case.lesion is None
        else nifti_base64(np.asarray(case.lesion), aff, kind="label"),
    }
    return f"radflowCase({index},{_script_json(vols)});\n"


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
