"""ingest: index a raw DICOM tree (headers only) and select one series per study, with reasons.

Pure pieces (``summarize_series``, ``select_series``, ``join_labels``, ``add_pseudonyms``) work on
DataFrames and are testable without files; ``read_header`` and ``ingest`` are the I/O edges. The raw
tree is only ever opened for reading.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from radflow import geometry, ids
from radflow.io import write_table, write_text
from radflow.labels import LabelSpec, join_labels, read_labels
from radflow.settings import section

PHI_COLUMNS = (
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
}
_SEQ_DELIM = b"\xfe\xff\xdd\xe0"


@dataclass(frozen=True)
class SelectionRules:
    """Which series can become a case, and how one is chosen per study."""

    modalities: tuple[str, ...] = ("CT",)
    exclude_image_types: tuple[str, ...] = ("LOCALIZER", "DERIVED", "SECONDARY", "PROJECTION IMAGE")
    min_slices: int = 20
    max_slice_thickness_mm: float = 3.0
    orientations: tuple[str, ...] = ("axial",)
    oblique_tolerance_deg: float = 20.0
    preferred_kernel: str = r"^(b[1-4]\d[fs]?|br[1-4]\d.*|i[1-4]\d[fs]?|standard|soft|b|fc1\d)$"
    max_missing_slices: int = 1
    gantry_tilt: str = "resample"  # or "refuse"
    max_gantry_tilt_deg: float = 30.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SelectionRules:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "selection", ("modalities", "exclude_image_types", "orientations"))
        return cls(**d)


# --------------------------------------------------------------------------- file level


def iter_files(raw_dir: str | os.PathLike) -> Iterator[Path]:
    """Every regular file under ``raw_dir`` (recursively, symlinks not followed), sorted."""
    for root, dirs, files in os.walk(raw_dir):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if p.is_file():
                yield p


def _str(ds: pydicom.Dataset, key: str) -> str:
    v = ds.get(key, "")
    if isinstance(v, pydicom.multival.MultiValue):
        return "\\".join(str(x) for x in v)
    return "" if v is None else str(v).strip()


def _floats(ds: pydicom.Dataset, key: str) -> list[float] | None:
    v = ds.get(key)
    if v is None or v == "":
        return None
    try:
        return [float(x) for x in (v if isinstance(v, list | pydicom.multival.MultiValue) else [v])]
    except (TypeError, ValueError):
        return None


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Header fields of one file (pixels not read); ``error`` is set when it is not usable."""
    path = str(path)
    rec: dict[str, Any] = {"path": path, "error": ""}
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            pixel_offset = fp.tell()
    except InvalidDicomError as exc:
        rec["error"] = f"not DICOM: {exc}"
        return rec
    except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, never fatal
        rec["error"] = f"unreadable DICOM header: {type(exc).__name__}: {exc}"
        return rec
    for key in (
        "SOPClassUID",
        "Modality",
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "AccessionNumber",
        "SeriesDescription",
        "ConvolutionKernel",
        "Manufacturer",
        "ManufacturerModelName",
        "ImageType",
    ):
        rec[key] = _str(ds, key)
    rec["TransferSyntaxUID"] = _str(ds.file_meta, "TransferSyntaxUID") if ds.file_meta else ""
    for key in (
        "SeriesNumber",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ):
        v = ds.get(key)
        rec[key] = int(v) if v not in (None, "") else None
    for key in ("SliceThickness", "RescaleIntercept", "RescaleSlope", "GantryDetectorTilt"):
        v = _floats(ds, key)
        rec[key] = v[0] if v else None
    rec["PixelSpacing"] = _floats(ds, "PixelSpacing")
    rec["ImageOrientationPatient"] = _floats(ds, "ImageOrientationPatient")
    rec["ImagePositionPatient"] = _floats(ds, "ImagePositionPatient")
    rec["has_pixels"] = bool(rec["Rows"]) and pixel_offset < size
    if not rec["SeriesInstanceUID"] or not rec["StudyInstanceUID"]:
        rec["error"] = "DICOM without StudyInstanceUID/SeriesInstanceUID"
    elif rec["Rows"] and rec["Columns"]:
        rec["error"] = _truncation(path, size, pixel_offset, rec)
    return rec


def _truncation(path: str, size: int, offset: int, rec: dict[str, Any]) -> str:
    """Empty string when the pixel data is complete, else the reason it is not."""
    if offset >= size:
        return "truncated: header present but no pixel data"
    frames = rec.get("NumberOfFrames") or 1
    if rec["TransferSyntaxUID"] in NATIVE_SYNTAXES:
        need = rec["Rows"] * rec["Columns"] * (rec["BitsAllocated"] or 16) // 8 * frames
        have = size - offset - 8  # at least an 8-byte element header precedes the value
        if have < need:
            return f"truncated: pixel data needs {need} bytes, file holds at most {max(have, 0)}"
        return ""
    with open(path, "rb") as fh:  # encapsulated: the fragment sequence must be closed
        fh.seek(max(offset, size - 4096))
        tail = fh.read()
    if _SEQ_DELIM not in tail:
        return "truncated: encapsulated pixel data has no sequence delimiter"
    return ""


def _read_chunk(paths: list[str]) -> list[dict[str, Any]]:
    return [read_header(p) for p in paths]


def scan(raw_dir: str | os.PathLike, threads: int = 1, chunk: int = 64) -> pd.DataFrame:
    """Read the header of every file under ``raw_dir`` in up to ``threads`` processes."""
    paths = [str(p) for p in iter_files(raw_dir)]
    if not paths:
        raise FileNotFoundError(f"no files under raw_dir {raw_dir!s}")
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(paths), desc="ingest headers", unit="file", file=sys.stderr, mininterval=2)
    if threads <= 1:
        for c in chunks:
            records.extend(_read_chunk(c))
            bar.update(len(c))
    else:
        with ProcessPoolExecutor(max_workers=threads) as pool:
            futures = {pool.submit(_read_chunk, c): len(c) for c in chunks}
            for fut in as_completed(futures):
                records.extend(fut.result())
                bar.update(futures[fut])
    bar.close()
    df = pd.DataFrame.from_records(records)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- series level


def _first(values: Iterable[Any]) -> Any:
    for v in values:
        if v is not None and v == v and v != "":
            return v
    return None


def summarize_series(files: pd.DataFrame, rules: SelectionRules) -> pd.DataFrame:
    """One row per (study, series) from file-level headers (raw identifiers still present)."""
    dicom = files[files["StudyInstanceUID"].fillna("").astype(bool)] if len(files) else files
    rows = []
    for (study_uid, series_uid), g in dicom.groupby(
        ["StudyInstanceUID", "SeriesInstanceUID"], sort=True
    ):
        good = g[g["error"] == ""]
        rows.append(_series_row(study_uid, series_uid, g, good, rules))
    return pd.DataFrame(rows)


def _series_row(
    study_uid: str, series_uid: str, g: pd.DataFrame, good: pd.DataFrame, rules: SelectionRules
) -> dict[str, Any]:
    ref = good if len(good) else g
    image_type = _first(ref["ImageType"]) or ""
    row: dict[str, Any] = {
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "PatientID": _first(ref["PatientID"]) or "",
        "PatientName": _first(ref["PatientName"]) or "",
        "AccessionNumber": _first(ref["AccessionNumber"]) or "",
        "series_number": _first(ref["SeriesNumber"]),
        "modality": _first(ref["Modality"]) or "",
        "sop_class_uid": _first(ref["SOPClassUID"]) or "",
        "image_type": image_type,
        "description": _first(ref["SeriesDescription"]) or "",
        "kernel": _first(ref["ConvolutionKernel"]) or "",
        "manufacturer": _first(ref["Manufacturer"]) or "",
        "model": _first(ref["ManufacturerModelName"]) or "",
        "n_instances": int(len(good)),
        "n_bad_files": int(len(g) - len(good)),
        "n_frames": int(np.nansum([f or 1 for f in good["NumberOfFrames"]])) if len(good) else 0,
        "transfer_syntax": "\\".join(sorted(set(ref["TransferSyntaxUID"].dropna()))),
        "rescale_intercept": "\\".join(
            sorted({f"{v:g}" for v in good["RescaleIntercept"].dropna()})
        ),
        "has_pixels": bool(good["has_pixels"].all()) if len(good) else False,
    }
    thick = good["SliceThickness"].dropna()
    row["slice_thickness_mm"] = float(thick.median()) if len(thick) else np.nan
    ps = [p for p in good["PixelSpacing"] if isinstance(p, list | np.ndarray) and len(p) == 2]
    row["pixel_spacing_row_mm"] = float(np.median([p[0] for p in ps])) if ps else np.nan
    row["pixel_spacing_col_mm"] = float(np.median([p[1] for p in ps])) if ps else np.nan
    row["rows"] = _first(good["Rows"]) if len(good) else None
    row["cols"] = _first(good["Columns"]) if len(good) else None
    row.update(_geometry(good, rules))
    return row


def _geometry(good: pd.DataFrame, rules: SelectionRules) -> dict[str, Any]:
    out: dict[str, Any] = {
        "orientation": "unknown",
        "obliquity_deg": np.nan,
        "gantry_tilt_deg": np.nan,
        "slice_spacing_mm": np.nan,
        "slice_spacing_uniform": False,
        "missing_slices": 0,
        "irregular_spacing": False,
        "duplicate_positions": 0,
        "consistent_geometry": False,
        "instance_order": "",
    }
    iops = [
        np.asarray(v)
        for v in good["ImageOrientationPatient"]
        if isinstance(v, list | np.ndarray) and len(v) == 6
    ]
    ipps = [
        np.asarray(v)
        for v in good["ImagePositionPatient"]
        if isinstance(v, list | np.ndarray) and len(v) == 3
    ]
    if not iops or len(ipps) != len(good):
        return out
    iop = iops[0]
    out["consistent_geometry"] = bool(
        len(iops) == len(good)
        and all(np.allclose(v, iop, atol=1e-3) for v in iops)
        and good["Rows"].nunique() == 1
        and good["Columns"].nunique() == 1
    )
    label, angle = geometry.plane_orientation(iop, rules.oblique_tolerance_deg)
    out["orientation"], out["obliquity_deg"] = label, round(angle, 3)
    p = np.stack(ipps)
    pos = geometry.project_positions(p, iop)
    sp = geometry.slice_spacing(pos)
    out["slice_spacing_mm"] = round(sp.step_mm, 4)
    out["slice_spacing_uniform"] = sp.uniform
    out["missing_slices"] = sp.missing
    out["irregular_spacing"] = sp.irregular
    out["duplicate_positions"] = sp.duplicates
    out["gantry_tilt_deg"] = round(geometry.gantry_tilt_deg(p, iop), 3)
    inst = good["InstanceNumber"].to_numpy(dtype=float)
    if len(p) > 1 and not np.isnan(inst).any():
        r = np.corrcoef(inst, pos)[0, 1] if np.std(inst) and np.std(pos) else 0.0
        out["instance_order"] = "increasing" if r > 0 else "decreasing"
    return out


# --------------------------------------------------------------------------- selection


def exclusion(row: pd.Series | dict[str, Any], rules: SelectionRules) -> tuple[str, str]:
    """(code, reason) when a series cannot become a case; ("", "") when it is eligible."""
    r = row
    if r["n_bad_files"] and r["n_instances"] == 0:
        return "UNREADABLE", f"all {r['n_bad_files']} file(s) unreadable or truncated"
    if r["modality"] not in rules.modalities:
        return "MODALITY", f"modality {r['modality'] or '?'} not in {list(rules.modalities)}"
    if not r["has_pixels"]:
        return "NO_PIXELS", "non-image object (no pixel data)"
    types = [t.strip().upper() for t in str(r["image_type"]).split("\\")]
    bad = [t for t in rules.exclude_image_types if t.upper() in types]
    if bad:
        return "IMAGE_TYPE", f"image type {r['image_type']} contains {', '.join(bad)}"
    if r["n_bad_files"]:
        return "BAD_FILES", f"{r['n_bad_files']} unreadable or truncated instance(s)"
    if r["n_frames"] > r["n_instances"]:
        return "MULTIFRAME", "multi-frame (enhanced) series are not supported yet"
    if r["n_instances"] < rules.min_slices:
        return "TOO_FEW_SLICES", f"{r['n_instances']} instances < min_slices {rules.min_slices}"
    if not r["consistent_geometry"]:
        return "INCONSISTENT_GEOMETRY", "orientation or matrix differs between instances"
    th = r["slice_thickness_mm"]
    if th == th and th > rules.max_slice_thickness_mm:
        return "TOO_THICK", f"slice thickness {th:g} mm > max {rules.max_slice_thickness_mm:g} mm"
    if r["orientation"] not in rules.orientations:
        return (
            "ORIENTATION",
            f"orientation {r['orientation']} ({r['obliquity_deg']:.1f} deg off-axis) "
            f"not in {list(rules.orientations)}",
        )
    if r["duplicate_positions"]:
        return "DUPLICATE_POSITIONS", f"{r['duplicate_positions']} slices share a position"
    if r["irregular_spacing"]:
        return "IRREGULAR_SPACING", "slice spacing is irregular (not a whole-slice gap)"
    if r["missing_slices"] > rules.max_missing_slices:
        return (
            "SLICE_GAP",
            f"{r['missing_slices']} missing slice(s) > max_missing_slices "
            f"{rules.max_missing_slices}",
        )
    tilt = r["gantry_tilt_deg"]
    if tilt == tilt and tilt > 0.5:
        if rules.gantry_tilt == "refuse":
            return "GANTRY_TILT", f"gantry tilt {tilt:.1f} deg and convert.gantry_tilt=refuse"
        if tilt > rules.max_gantry_tilt_deg:
            return "GANTRY_TILT", f"gantry tilt {tilt:.1f} deg > max {rules.max_gantry_tilt_deg:g}"
    return "", ""


def _rank_key(r: pd.Series, pattern: re.Pattern[str]) -> tuple:
    th = r["slice_thickness_mm"]
    return (
        0 if pattern.search(str(r["kernel"])) else 1,
        th if th == th else 1e9,
        -int(r["n_instances"]),
        r["series_number"] if r["series_number"] == r["series_number"] else 1e9,
        r["SeriesInstanceUID"],
    )


def _why_preferred(win: tuple, lose: tuple, w: pd.Series, lo: pd.Series) -> str:
    if win[0] != lose[0]:
        return f"preferred kernel ({w['kernel']} over {lo['kernel']})"
    if win[1] != lose[1]:
        return f"thinner ({w['slice_thickness_mm']:g} mm < {lo['slice_thickness_mm']:g} mm)"
    if win[2] != lose[2]:
        return f"more instances ({w['n_instances']} > {lo['n_instances']})"
    return "lower series number"


def _num(v: Any) -> str:
    return "?" if v is None or v != v else f"{v:g}"


def select_series(series: pd.DataFrame, rules: SelectionRules) -> pd.DataFrame:
    """Add ``selected``, ``reason_code`` and ``reason``: at most one selected series per study."""
    out = series.copy()
    codes, reasons = (
        zip(*(exclusion(r, rules) for _, r in out.iterrows()), strict=True)
        if len(out)
        else ((), ())
    )
    out["reason_code"] = list(codes)
    out["reason"] = list(reasons)
    out["selected"] = False
    pattern = re.compile(rules.preferred_kernel, re.IGNORECASE)
    for _, g in out.groupby("StudyInstanceUID", sort=False):
        eligible = g[g["reason_code"] == ""]
        if eligible.empty:
            continue
        keys = {i: _rank_key(r, pattern) for i, r in eligible.iterrows()}
        best = min(keys, key=keys.get)
        w = out.loc[best]
        out.loc[best, "selected"] = True
        out.loc[best, "reason_code"] = "SELECTED"
        out.loc[best, "reason"] = (
            f"selected: {w['orientation']} {w['kernel'] or 'unknown-kernel'} kernel, "
            f"{w['slice_thickness_mm']:g} mm, {w['n_instances']} instances"
            + ("" if len(eligible) == 1 else f"; best of {len(eligible)} eligible series")
        )
        for i in keys:
            if i == best:
                continue
            out.loc[i, "reason_code"] = "NOT_PREFERRED"
            out.loc[i, "reason"] = (
                f"eligible, not chosen: series {_num(w['series_number'])} "
                f"{_why_preferred(keys[best], keys[i], w, out.loc[i])}"
            )
    return out


def flags(row: pd.Series) -> str:
    """Semicolon-separated notes worth knowing about a series (informational)."""
    f = []
    if row.get("instance_order") == "decreasing":
        f.append("instance_number_descending")
    tilt = row.get("gantry_tilt_deg")
    if tilt == tilt and tilt is not None and tilt > 0.5:
        f.append("gantry_tilt")
    if row.get("missing_slices"):
        f.append("missing_slices")
    if "1.2.840.10008.1.2.5" in str(row.get("transfer_syntax", "")):
        f.append("rle")
    has = row.get("has_label")
    if row.get("selected") and has is not None and not pd.isna(has) and not has:
        f.append("no_label")  # only when a sheet was given (NA = no sheet: unknown)
    return ";".join(f)


# --------------------------------------------------------------------------- labels & ids


def add_pseudonyms(series: pd.DataFrame, salt: str) -> pd.DataFrame:
    """Add subject/study/series/case pseudonyms (keyed hashes) beside the raw identifiers."""
    out = series.copy()
    out["subject_id"] = [ids.pseudonym("subject", v, salt) for v in out["PatientID"]]
    out["study_id"] = [ids.pseudonym("study", v, salt) for v in out["StudyInstanceUID"]]
    out["series_id"] = [ids.pseudonym("series", v, salt) for v in out["SeriesInstanceUID"]]
    out["case_id"] = [
        ids.case_id(st, se, salt) if sel else ""
        for st, se, sel in zip(
            out["StudyInstanceUID"], out["SeriesInstanceUID"], out["selected"], strict=True
        )
    ]
    return out


def split_private(series: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a pseudonymised frame into (public inventory, private id map)."""
    id_map = series[["subject_id", "study_id", "series_id", "case_id", *PHI_COLUMNS]].copy()
    public = series[INVENTORY_COLUMNS].copy()
    return public, id_map


INVENTORY_COLUMNS = [
    "case_id",
    "subject_id",
    "study_id",
    "series_id",
    "selected",
    "reason_code",
    "reason",
    "label",
    "has_label",
    "flags",
    "series_number",
    "modality",
    "image_type",
    "description",
    "kernel",
    "manufacturer",
    "model",
    "n_instances",
    "n_bad_files",
    "n_frames",
    "slice_thickness_mm",
    "pixel_spacing_row_mm",
    "pixel_spacing_col_mm",
    "rows",
    "cols",
    "orientation",
    "obliquity_deg",
    "gantry_tilt_deg",
    "slice_spacing_mm",
    "slice_spacing_uniform",
    "missing_slices",
    "irregular_spacing",
    "duplicate_positions",
    "instance_order",
    "transfer_syntax",
    "rescale_intercept",
    "sop_class_uid",
    "has_pixels",
    "consistent_geometry",
]


def ingest(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    private_dir: str | os.PathLike,
    rules: SelectionRules,
    labels: LabelSpec,
    salt: str,
    threads: int = 1,
) -> pd.DataFrame:
    """Index ``raw_dir`` and write the inventory, rejected files, id map and per-case file lists."""
    out_dir, private_dir = Path(out_dir), Path(private_dir)
    files = scan(raw_dir, threads=threads)
    series = summarize_series(files, rules)
    series = select_series(series, rules)
    series = join_labels(series, read_labels(labels), labels)
    series["flags"] = [flags(r) for _, r in series.iterrows()]
    series = add_pseudonyms(series, salt)
    public, id_map = split_private(series)
    public = public.sort_values(["subject_id", "study_id", "series_number"], kind="stable")
    write_table(public, out_dir / "series.csv", str(out_dir / "series.parquet"))
    _write_rejected(files, series, salt, raw_dir, out_dir, private_dir)
    write_table(
        id_map.sort_values(["subject_id", "study_id", "series_id"]),
        private_dir / "id_map.csv",
        str(private_dir / "id_map.parquet"),
    )
    _write_filelists(files, series, private_dir / "series")
    return public


def _write_rejected(
    files: pd.DataFrame,
    series: pd.DataFrame,
    salt: str,
    raw_dir: str | os.PathLike,
    out_dir: Path,
    private_dir: Path,
) -> None:
    """Unusable files: public table with pseudonymous ids, private one with the raw paths."""
    bad = files[files["error"] != ""].copy()
    rel = [os.path.relpath(p, raw_dir) for p in bad["path"]]
    bad["file_id"] = [
        ids.pseudonym("series", f"file:{r}", salt).replace("ser-", "file-") for r in rel
    ]
    bad["series_id"] = [
        ids.pseudonym("series", s, salt) if isinstance(s, str) and s else ""
        for s in bad.get("SeriesInstanceUID", pd.Series([""] * len(bad), index=bad.index))
    ]
    bad["extension"] = [ids.sanitize(Path(r).suffix.lstrip(".") or "none", 16) for r in rel]
    bad["size_bytes"] = [os.path.getsize(p) for p in bad["path"]]
    # the error text never carries header values, only pydicom's message about the bytes
    public = bad[["file_id", "series_id", "extension", "size_bytes", "error"]]
    write_table(public, out_dir / "rejected_files.csv")
    private = bad.assign(relative_path=rel)[["file_id", "series_id", "relative_path", "error"]]
    write_table(private, private_dir / "rejected_files.csv")


def _write_filelists(files: pd.DataFrame, series: pd.DataFrame, dest: Path) -> None:
    """One text file per selected case listing its readable instances (private: raw paths)."""
    dest.mkdir(parents=True, exist_ok=True)
    good = files[files["error"] == ""]
    by_series = {k: g["path"] for k, g in good.groupby("SeriesInstanceUID")}
    wanted = set()
    for _, r in series[series["selected"]].iterrows():
        wanted.add(f"{r['case_id']}.txt")
        text = "\n".join(sorted(by_series[r["SeriesInstanceUID"]])) + "\n"
        target = dest / f"{r['case_id']}.txt"
        # unchanged lists keep their mtime, so re-ingesting does not re-trigger conversions
        if not target.exists() or target.read_text() != text:
            write_text(target, text)
    for stale in dest.glob("*.txt"):
        if stale.name not in wanted:
            stale.unlink()


def summary(inventory: pd.DataFrame) -> str:
    """What ingest found: series, studies, subjects, cases, and the reason codes."""
    n_sel = int(inventory["selected"].sum())
    head = (
        f"{len(inventory)} series in {inventory['study_id'].nunique()} studies of "
        f"{inventory['subject_id'].nunique()} subjects; {n_sel} selected as cases"
    )
    return head + "\n" + inventory.groupby("reason_code").size().to_string()
