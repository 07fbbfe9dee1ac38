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

The page is three files of this package, read with ``importlib.resources`` and inlined when a page
is written: ``page.html`` (the markup, with ``{{name}}`` placeholders, see ``PLACEHOLDERS``),
``review.css`` (its styles) and ``review.js`` (the viewer).
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from radflow.io import atomic_path

# positive / negative: predicted, without a label (a predict cohort without labels)
GROUPS = ("TP", "FP", "FN", "TN", "positive", "negative", "unlabelled")
GZIP_LEVEL = 6  # on noisy 64³ CT + CAM + ROI, level 9 saves < 1 % at twice the time

# The placeholders of page.html, each used once. A block placeholder stands alone on its line and
# that whole line is replaced by text ending in a newline (or by nothing); the others are inline.
INLINE_PLACEHOLDERS = ("title", "heading", "data")  # page title, <h1> text, the JSON description
BLOCK_PLACEHOLDERS = ("styles", "volumes", "script")  # review.css, one <script> per case, review.js
PLACEHOLDERS = INLINE_PLACEHOLDERS + BLOCK_PLACEHOLDERS
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


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
    """Cases in display order: by group (``GROUPS``), most confident first."""
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
    fill = {
        "title": html.escape(title),
        "heading": html.escape(title),
        "data": _script_json(data),
        "styles": _asset("review.css"),
        "script": _asset("review.js"),
    }
    parts = _page_parts()
    with atomic_path(out_html) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for k, part in enumerate(parts):
            if k % 2 == 0:  # text of page.html
                fh.write(part)
            elif part == "volumes":  # streamed: one gzip+base64 <script> element per case
                for i, case in enumerate(ordered):
                    fh.write(f'<script type="application/octet-stream" id="vol-{i}">')
                    fh.write(_encode_volumes(case))
                    fh.write("</script>\n")
            else:
                fh.write(fill[part])


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
