"""ingest: index a raw DICOM tree (headers only) and select one series per study, with reasons.

Pure pieces (``summarize_series``, ``select_series``, ``join_labels``, ``add_pseudonyms``) work on
DataFrames and are testable without files; ``read_header`` and ``ingest`` are the I/O edges. The raw
tree is only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import json
import os
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

from radflow import dicomsafe, geometry, ids, kernels, multiframe, paths
from radflow.dicomsafe import error_text
from radflow.io import write_table, write_text
from radflow.labels import LabelSpec, join_labels, read_labels
from radflow.settings import section
from radflow.source import InputSpec

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
    preferred_kernel_classes: tuple[str, ...] = ("soft", "standard")
    max_missing_slices: int = 1
    gantry_tilt: str = "resample"  # or "refuse"
    irregular_spacing: str = "resample"  # or "refuse"
    max_gantry_tilt_deg: float = 30.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SelectionRules:
        """Build from a config mapping (unknown keys are an error)."""
        if d and "preferred_kernel" in d:
            raise ValueError(
                "ingest.selection.preferred_kernel (a regex) was replaced by "
                "preferred_kernel_classes, a list of kernel classes such as [soft, standard]"
            )
        tuples = ("modalities", "exclude_image_types", "orientations", "preferred_kernel_classes")
        d = section(cls, d, "selection", tuples)
        bad = set(d.get("preferred_kernel_classes", ())) - {*kernels.CLASSES, kernels.UNKNOWN}
        if bad:
            raise ValueError(
                f"unknown preferred_kernel_classes {sorted(bad)}; "
                f"known: {[*kernels.CLASSES, kernels.UNKNOWN]}"
            )
        return cls(**d)


# --------------------------------------------------------------------------- file level


def iter_files(
    raw_dir: str | os.PathLike, errors: list[tuple[str, str]] | None = None
) -> Iterator[Path]:
    """Every regular file under ``raw_dir`` (recursively, symlinks not followed), sorted.

    A folder that cannot be listed is appended to ``errors`` as (path, reason) instead of
    vanishing. Names need not be UTF-8: they come as ``os.fsdecode`` gives them (surrogates).
    """

    def onerror(exc: OSError) -> None:
        if errors is not None:
            errors.append((str(exc.filename or raw_dir), f"unreadable folder: {error_text(exc)}"))

    for root, dirs, files in os.walk(raw_dir, onerror=onerror):
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


def read_header(
    path: str | os.PathLike, max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB
) -> dict[str, Any]:
    """Header fields of one file (pixels not read); ``error`` is set when it is not usable.

    Nothing is allocated or inflated beyond the header before the size the header claims is
    checked against ``max_image_mb``; error texts never hold the path.
    """
    path = str(path)
    rec: dict[str, Any] = {"path": path, "error": ""}
    try:
        size = os.path.getsize(path)
        head = dicomsafe.read_header(path, max_image_mb)
        ds = head.ds
    except InvalidDicomError as exc:
        rec["error"] = f"not DICOM: {dicomsafe.scrub(str(exc), path)}"
        return rec
    except dicomsafe.HeaderError as exc:
        rec["error"] = str(exc) if str(exc).startswith("truncated") else f"unusable: {exc}"
        return rec
    except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, never fatal
        rec["error"] = f"unreadable DICOM header: {error_text(exc, path)}"
        return rec
    for key in (
        "SOPInstanceUID",
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
        "FrameOfReferenceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
    ):
        rec[key] = _str(ds, key)
    rec["SOPClassUID"] = dicomsafe.sop_class_uid(ds)
    rec["TransferSyntaxUID"] = head.transfer_syntax
    for key in (
        "SeriesNumber",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ):
        try:
            v = ds.get(key)
            rec[key] = int(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            rec[key] = None
    for key in ("SliceThickness", "RescaleIntercept", "RescaleSlope", "GantryDetectorTilt"):
        v = _floats(ds, key)
        rec[key] = v[0] if v else None
    rec["PixelSpacing"] = _floats(ds, "PixelSpacing")
    rec["ImageOrientationPatient"] = _floats(ds, "ImageOrientationPatient")
    rec["ImagePositionPatient"] = _floats(ds, "ImagePositionPatient")
    rec["frame_positions"] = None
    rec["multiframe_error"] = ""
    if multiframe.is_multiframe(ds):  # one file, many slices: the frames' own geometry
        try:
            fr = multiframe.frame_headers(ds)
            rec["frame_positions"] = [[float(v) for v in h.ImagePositionPatient] for h in fr]
            rec["ImageOrientationPatient"] = [float(v) for v in fr[0].ImageOrientationPatient]
            rec["PixelSpacing"] = [float(v) for v in fr[0].PixelSpacing]
            thick = fr[0].get("SliceThickness")
            rec["SliceThickness"] = float(thick) if thick not in (None, "") else None
        except multiframe.MultiFrameError as exc:
            rec["multiframe_error"] = f"[{exc.code}] {exc.reason}"
        except (TypeError, ValueError, AttributeError) as exc:
            rec["multiframe_error"] = f"[MULTIFRAME_GEOMETRY] unreadable frame geometry ({exc})"
    rec["has_pixels"] = bool(rec["Rows"]) and head.has_pixels
    rec["claim_bytes"] = dicomsafe.int16_claim_bytes(ds)
    # blank UIDs are no reason to reject a file: ``assign_keys`` groups it by fallback keys
    rec["kind"] = "image"
    other = dicomsafe.non_image_reason(ds, head.has_pixels)
    if other:
        rec["kind"] = other.split(":")[0]
        rec["error"] = other
    elif rec["Rows"] and rec["Columns"]:
        # the budget first: a file over it is never read further, whatever else is wrong
        rec["error"] = dicomsafe.claim_error(ds, max_image_mb)
        if not rec["error"] and not head.has_pixels:
            rec["error"] = "truncated: header present but no pixel data"
        elif not rec["error"]:
            try:
                rec["error"] = _truncation(path, size, head, rec)
            except OSError as exc:  # gone or locked since its header was read
                rec["error"] = f"unreadable DICOM header: {error_text(exc, path)}"
    return rec


def _truncation(path: str, size: int, head: dicomsafe.Header, rec: dict[str, Any]) -> str:
    """Empty string when the pixel data is complete, else the reason it is not."""
    frames = rec.get("NumberOfFrames") or 1
    need = rec["Rows"] * rec["Columns"] * (rec["BitsAllocated"] or 16) // 8 * frames
    if head.pixel_bytes_available is not None:  # deflated: counted while inflating
        if head.pixel_bytes_available < need:
            return (
                f"truncated: pixel data needs {need} bytes, "
                f"the deflate stream holds {head.pixel_bytes_available}"
            )
        return ""
    offset = head.pixel_offset or 0
    if head.transfer_syntax in NATIVE_SYNTAXES:
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


def _read_chunk(paths: list[str], max_image_mb: float) -> list[dict[str, Any]]:
    return [read_header(p, max_image_mb) for p in paths]


def scan(
    raw_dir: str | os.PathLike,
    threads: int = 1,
    chunk: int = 64,
    max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB,
) -> pd.DataFrame:
    """Read the header of every file under ``raw_dir`` in up to ``threads`` processes.

    A folder that cannot be listed becomes a row with ``error`` "unreadable folder: ...".
    """
    folder_errors: list[tuple[str, str]] = []
    paths = [str(p) for p in iter_files(raw_dir, folder_errors)]
    if not paths:
        why = f" ({folder_errors[0][1]})" if folder_errors else ""
        raise FileNotFoundError(f"no readable files under raw_dir {raw_dir!s}{why}")
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    records: list[dict[str, Any]] = [{"path": p, "error": e} for p, e in folder_errors]
    bar = tqdm(total=len(paths), desc="ingest headers", unit="file", file=sys.stderr, mininterval=2)
    if threads <= 1:
        for c in chunks:
            records.extend(_read_chunk(c, max_image_mb))
            bar.update(len(c))
    else:
        with ProcessPoolExecutor(max_workers=threads) as pool:
            futures = {pool.submit(_read_chunk, c, max_image_mb): len(c) for c in chunks}
            for fut in as_completed(futures):
                records.extend(fut.result())
                bar.update(futures[fut])
    bar.close()
    # paths stay Python objects: a name that is not UTF-8 holds lone surrogates, which pandas'
    # Arrow-backed strings cannot store (and which ``open`` needs as they are)
    path_col = pd.Series([r.pop("path") for r in records], dtype=object)
    df = pd.DataFrame.from_records(records)
    df.insert(0, "path", path_col)
    for col in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "kind"):
        if col not in df.columns:
            df[col] = None
    return df.sort_values("path", kind="stable").reset_index(drop=True)


# Header fields that tell series apart where an anonymiser blanked SeriesInstanceUID (with the
# folder and the study key); none of them varies between the instances of one series.
SERIES_FALLBACK_KEYS = (
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "ConvolutionKernel",
    "ImageType",
    "Rows",
    "Columns",
    "FrameOfReferenceUID",
)
# ... and studies where StudyInstanceUID is blank; the frame of reference (else the folder)
# keeps two patients' blank-ID studies of one day apart.
STUDY_FALLBACK_KEYS = ("PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID")


def _blank(v: Any) -> bool:
    return v is None or v != v or str(v).strip() == ""


def _part(v: Any) -> str:
    """A key field as text, the same whether pandas held it as int or float (512 and 512.0)."""
    if _blank(v):
        return ""
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _digest(kind: str, parts: Iterable[Any]) -> str:
    text = "\x1f".join(_part(v) for v in parts)
    h = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return f"{kind}-fallback-{h}"


def _orientation_key(iop: Any) -> str:
    """ImageOrientationPatient to 0.01 (about half a degree): one series has one orientation."""
    if not isinstance(iop, list | np.ndarray) or len(iop) != 6:
        return ""
    return ",".join(f"{v:.2f}" for v in np.round(np.asarray(iop, dtype=float), 2) + 0.0)


def assign_keys(files: pd.DataFrame, raw_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Add ``study_key``, ``series_key`` and ``uid_fallback`` to the image files.

    The keys are the UIDs where present. A blank or missing StudyInstanceUID or
    SeriesInstanceUID is replaced by a synthetic key hashed from fallback fields (folder relative
    to ``raw_dir``, series number, modality, description, kernel, image type, orientation,
    matrix, frame of reference; for the study: patient, date, time, accession, study id and the
    frame of reference, else the folder), stable between runs; ``uid_fallback`` also marks a
    blank SOPInstanceUID. Other files (not DICOM, DICOMDIR, non-image objects) get no key.
    """
    out = files.copy()
    out["study_key"], out["series_key"], out["uid_fallback"] = None, None, False
    is_image = out["kind"] == "image"
    for i, r in out[is_image].iterrows():
        folder = os.path.dirname(r["path"])
        if raw_dir is not None:
            folder = os.path.relpath(folder, raw_dir)
        study = r["StudyInstanceUID"]
        if _blank(study):
            fref = r.get("FrameOfReferenceUID")
            anchor = f"for:{fref}" if not _blank(fref) else f"dir:{folder}"
            study = _digest("study", [*(r.get(k) for k in STUDY_FALLBACK_KEYS), anchor])
        series = r["SeriesInstanceUID"]
        if _blank(series):
            values = [r.get(k) for k in SERIES_FALLBACK_KEYS]
            orient = _orientation_key(r.get("ImageOrientationPatient"))
            series = _digest("series", [study, folder, orient, *values])
        out.at[i, "study_key"], out.at[i, "series_key"] = study, series
        out.at[i, "uid_fallback"] = any(
            _blank(r[k]) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        )
    return out


def _instance_key(r: pd.Series) -> str:
    """SOPInstanceUID, or where it is blank the instance's number and position (a byte-identical
    copy of an instance has both)."""
    if not _blank(r["SOPInstanceUID"]):
        return str(r["SOPInstanceUID"])
    pos = r.get("ImagePositionPatient")
    pos = ",".join(f"{v:.3f}" for v in pos) if isinstance(pos, list | np.ndarray) else ""
    return f"fallback:{r.get('InstanceNumber')}:{pos}"


def mark_duplicates(files: pd.DataFrame) -> pd.DataFrame:
    """Add ``duplicate``: "copy" for a byte-identical second file of one SOPInstanceUID (kept
    once), "conflict" for files of one SOPInstanceUID whose bytes differ, else "".

    Where SOPInstanceUID is blank, byte-identical files of one instance number and position are
    copies too; different files there are left to the slice-position checks (duplicate
    positions), as nothing says they claim to be one instance.
    """
    out = files if "series_key" in files.columns else assign_keys(files)
    out = out.copy()
    out["duplicate"] = ""
    ok = out[(out["error"] == "") & out["series_key"].notna()].copy()
    ok["instance_key"] = [_instance_key(r) for _, r in ok.iterrows()]
    keys = ["series_key", "instance_key"]
    dup = ok[ok.duplicated(keys, keep=False)]
    for (_, inst), g in dup.groupby(keys, sort=False):
        digests = {i: _sha256(p) for i, p in g["path"].items()}
        if len(set(digests.values())) == 1:
            out.loc[list(g.index[1:]), "duplicate"] = "copy"
        elif not inst.startswith("fallback:"):
            out.loc[list(g.index), "duplicate"] = "conflict"
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return f"unreadable:{path}"
    return h.hexdigest()


# --------------------------------------------------------------------------- series level


def _first(values: Iterable[Any]) -> Any:
    for v in values:
        if v is not None and v == v and v != "":
            return v
    return None


def usable(files: pd.DataFrame) -> pd.Series:
    """Files that are part of their series: readable, and not a byte-identical copy."""
    ok = files["error"] == ""
    if "duplicate" in files.columns:
        ok &= files["duplicate"] != "copy"
    return ok


def summarize_series(
    files: pd.DataFrame,
    rules: SelectionRules,
    max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB,
) -> pd.DataFrame:
    """One row per (study, series) from file-level headers (raw identifiers still present).

    Files are grouped by ``study_key``/``series_key`` (``assign_keys``: the UIDs, or fallback
    keys where they are blank); files without a key (not images) belong to no series.
    """
    if "series_key" not in files.columns:
        files = assign_keys(files)
    dicom = files[files["series_key"].notna()] if len(files) else files
    rows = []
    for (study_key, series_key), g in dicom.groupby(["study_key", "series_key"], sort=True):
        good = g[usable(g)]
        row = _series_row(study_key, series_key, g, good, rules)
        row.update(_size_and_duplicates(g, good, max_image_mb))
        rows.append(row)
    if not rows:  # no usable DICOM at all: an empty table with its columns, not a crash
        derived = {
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
            "kernel_class",
        }
        cols = [*PHI_COLUMNS, "study_key", "series_key", "uid_fallback"]
        cols += [c for c in INVENTORY_COLUMNS if c not in derived]
        return pd.DataFrame(columns=cols)
    return pd.DataFrame(rows)


def _size_and_duplicates(g: pd.DataFrame, good: pd.DataFrame, max_image_mb: float) -> dict:
    """``too_large`` (reason or ""), ``duplicate_copies`` and ``duplicate_conflicts``."""
    errors = g["error"].fillna("")
    over = errors[errors.str.startswith("claims ")]
    if len(over):
        too = f"{len(over)} instance(s) over budget: {over.iloc[0]}"
    else:  # the int16 volume convert would allocate, over every file of the series
        claim = g.loc[errors == "", "claim_bytes"] if "claim_bytes" in g.columns else []
        too = dicomsafe.too_large(int(np.nansum(claim)), max_image_mb, "int16 volume")
        too = f"series {too}" if too else ""
    dup = g["duplicate"] if "duplicate" in g.columns else pd.Series([""] * len(g), index=g.index)
    conflicts = g.loc[dup == "conflict", "SOPInstanceUID"].nunique()
    return {
        "too_large": too,
        "duplicate_copies": int((dup == "copy").sum()),
        "duplicate_conflicts": int(conflicts),
    }


def _series_row(
    study_key: str, series_key: str, g: pd.DataFrame, good: pd.DataFrame, rules: SelectionRules
) -> dict[str, Any]:
    ref = good if len(good) else g
    image_type = _first(ref["ImageType"]) or ""
    row: dict[str, Any] = {
        "StudyInstanceUID": _first(g["StudyInstanceUID"]) or "",
        "SeriesInstanceUID": _first(g["SeriesInstanceUID"]) or "",
        "study_key": study_key,
        "series_key": series_key,
        "uid_fallback": bool(g["uid_fallback"].any()),
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
        "n_bad_files": int((g["error"] != "").sum()),
        "n_frames": int(sum(int(f) if f == f and f else 1 for f in good["NumberOfFrames"])),
        "transfer_syntax": "\\".join(sorted(set(ref["TransferSyntaxUID"].dropna()))),
        "rescale_intercept": "\\".join(
            sorted({f"{v:g}" for v in good["RescaleIntercept"].dropna()})
        ),
        "has_pixels": bool(good["has_pixels"].all()) if len(good) else False,
        "multiframe_error": _first(
            e for e in good.get("multiframe_error", pd.Series(dtype=str)).fillna("") if e
        )
        or "",
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
    frame_pos = good["frame_positions"] if "frame_positions" in good else [None] * len(good)
    ipps = []
    for v, fp in zip(good["ImagePositionPatient"], frame_pos, strict=True):
        if isinstance(fp, list) and fp:  # a multi-frame file: one position per frame
            ipps.extend(np.asarray(p) for p in fp)
        elif isinstance(v, list | np.ndarray) and len(v) == 3:
            ipps.append(np.asarray(v))
        else:
            return out
    if not iops:
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
    if sp.irregular and not sp.duplicates:  # output slices of the regular grid left uncovered
        thick = good["SliceThickness"].dropna()
        plan = geometry.regular_stack(np.sort(pos), float(thick.median()) if len(thick) else 0.0)
        out["missing_slices"] = len(plan.missing)
    out["gantry_tilt_deg"] = round(geometry.gantry_tilt_deg(p, iop), 3)
    inst = good["InstanceNumber"].to_numpy(dtype=float)
    if len(p) > 1 and len(inst) == len(p) and not np.isnan(inst).any():
        r = np.corrcoef(inst, pos)[0, 1] if np.std(inst) and np.std(pos) else 0.0
        out["instance_order"] = "increasing" if r > 0 else "decreasing"
    return out


# --------------------------------------------------------------------------- selection


def exclusion(row: pd.Series | dict[str, Any], rules: SelectionRules) -> tuple[str, str]:
    """(code, reason) when a series cannot become a case; ("", "") when it is eligible."""
    r = row
    if r.get("too_large"):  # before anything else: nothing of it is read further
        return "TOO_LARGE", str(r["too_large"])
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
    if r.get("duplicate_conflicts"):
        return (
            "DUPLICATE_SOP_INSTANCE",
            f"{r['duplicate_conflicts']} SOPInstanceUID(s) each held by different files",
        )
    if r.get("multiframe_error"):  # "[CODE] reason" of a multi-frame object not one volume
        code, _, reason = str(r["multiframe_error"]).partition("] ")
        return code.lstrip("["), reason
    if r["n_frames"] < rules.min_slices:  # a multi-frame file counts its frames as slices
        return "TOO_FEW_SLICES", f"{r['n_frames']} slices < min_slices {rules.min_slices}"
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
    if r["irregular_spacing"] and rules.irregular_spacing == "refuse":
        return (
            "IRREGULAR_SPACING",
            "slice spacing is irregular (not a whole-slice gap) and "
            "convert.irregular_spacing=refuse",
        )
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


def _kernel(r: pd.Series) -> kernels.Kernel:
    return kernels.classify(str(r.get("kernel", "") or ""), str(r.get("manufacturer", "") or ""))


def _rank_key(r: pd.Series, preferred: tuple[str, ...]) -> tuple:
    th = r["slice_thickness_mm"]
    return (
        kernels.rank(_kernel(r).kernel_class, preferred),
        th if th == th else 1e9,
        -int(r["n_instances"]),
        r["series_number"] if r["series_number"] == r["series_number"] else 1e9,
        str(r["series_key"] if "series_key" in r else r["SeriesInstanceUID"]),
    )


def _why_preferred(win: tuple, lose: tuple, w: pd.Series, lo: pd.Series) -> str:
    if win[0] != lose[0]:
        wk, lk = _kernel(w), _kernel(lo)
        return (
            f"kernel class {wk.kernel_class} ({wk.label}) preferred over "
            f"{lk.kernel_class} ({lk.label})"
        )
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
    out["kernel_class"] = [_kernel(r).kernel_class for _, r in out.iterrows()]
    study = out["study_key"] if "study_key" in out.columns else out["StudyInstanceUID"]
    for _, g in out.groupby(study, sort=False):
        eligible = g[g["reason_code"] == ""]
        if eligible.empty:
            continue
        keys = {i: _rank_key(r, rules.preferred_kernel_classes) for i, r in eligible.iterrows()}
        best = min(keys, key=keys.get)
        w = out.loc[best]
        wk = _kernel(w)
        out.loc[best, "selected"] = True
        out.loc[best, "reason_code"] = "SELECTED"
        out.loc[best, "reason"] = (
            f"selected: {w['orientation']} {wk.kernel_class} kernel ({wk.label}), "
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
    if row.get("uid_fallback"):
        f.append("uid_fallback")  # grouped by fallback keys: a UID was blank or missing
    if "PatientID" in row and _blank(row["PatientID"]):
        f.append("patient_id_fallback")  # subject_id derived from the study
    if row.get("source_flags"):  # NIfTI input: e.g. one volume of a 4-D file
        f.extend(str(row["source_flags"]).split(";"))
    if row.get("duplicate_copies"):
        f.append("duplicate_files_ignored")  # byte-identical copies of an instance, kept once
    if "1.2.840.10008.1.2.5" in str(row.get("transfer_syntax", "")):
        f.append("rle")
    has = row.get("has_label")
    if row.get("selected") and has is not None and not pd.isna(has) and not has:
        f.append("no_label")  # only when a sheet was given (NA = no sheet: unknown)
    return ";".join(f)


# --------------------------------------------------------------------------- labels & ids


def add_pseudonyms(series: pd.DataFrame, salt: str) -> pd.DataFrame:
    """Add subject/study/series/case pseudonyms (keyed hashes) beside the raw identifiers.

    Studies and series are named by their keys (the UIDs, or ``assign_keys``' fallback keys). A
    blank PatientID never merges patients: the subject is then derived from the study (two
    studies of one unnamed patient become two subjects; two unnamed patients never one).
    """
    out = series.copy()
    study = out["study_key"] if "study_key" in out.columns else out["StudyInstanceUID"]
    sers = out["series_key"] if "series_key" in out.columns else out["SeriesInstanceUID"]
    out["subject_id"] = [
        ids.pseudonym("subject", f"study:{st}" if _blank(pid) else pid, salt)
        for pid, st in zip(out["PatientID"], study, strict=True)
    ]
    out["study_id"] = [ids.pseudonym("study", v, salt) for v in study]
    out["series_id"] = [ids.pseudonym("series", v, salt) for v in sers]
    out["case_id"] = [
        ids.case_id(st, se, salt) if sel else ""
        for st, se, sel in zip(study, sers, out["selected"], strict=True)
    ]
    return out


PRIVATE_PATHS = ("image", "mask")  # NIfTI input: the sheet's resolved files (raw paths)


def split_private(series: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a pseudonymised frame into (public inventory, private id map)."""
    cols = ["subject_id", "study_id", "series_id", "case_id", *PHI_COLUMNS]
    cols += [c for c in ("study_key", "series_key", *PRIVATE_PATHS) if c in series.columns]
    id_map = series[cols]
    if "split" not in series.columns:  # DICOM: no split is given
        series = series.assign(split="")
    public = series[INVENTORY_COLUMNS].copy()
    return public, id_map.copy()


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
    "split",
    "flags",
    "series_number",
    "modality",
    "image_type",
    "description",
    "kernel",
    "kernel_class",
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


def _in_private(template: str) -> str:
    """A private output's path below the private folder (``paths`` names it from the root)."""
    return str(Path(template).relative_to(paths.PRIVATE))


def ingest(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    private_dir: str | os.PathLike,
    rules: SelectionRules,
    labels: LabelSpec,
    salt: str,
    threads: int = 1,
    max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB,
    source: InputSpec | None = None,
) -> pd.DataFrame:
    """Index the input and write the inventory, rejected files, id map and per-case file lists.

    ``source`` (config ``input``) says what ``raw_dir`` is: a raw DICOM tree (the default) or,
    for format nifti, the cohort sheet (``radflow.sheet``); both give the same outputs.
    ``max_image_mb`` bounds what one file's header, and one series' int16 volume, may claim:
    over it a file is rejected and its series excluded (TOO_LARGE) before any pixel is read.
    """
    out_dir, private_dir = Path(out_dir), Path(private_dir)
    source = source or InputSpec()
    if source.format == "nifti":
        files, series = _index_sheet(raw_dir, source, labels, max_image_mb)
        root = Path(raw_dir).resolve().parent
    else:
        files, series = _index_dicom(raw_dir, rules, labels, threads, max_image_mb)
        root = Path(raw_dir)
    return _write_outputs(files, series, salt, root, out_dir, private_dir)


def _index_dicom(
    raw_dir: str | os.PathLike,
    rules: SelectionRules,
    labels: LabelSpec,
    threads: int,
    max_image_mb: float,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(files, series) of a raw DICOM tree: headers read, series selected, labels joined."""
    files = assign_keys(scan(raw_dir, threads=threads, max_image_mb=max_image_mb), raw_dir)
    files = mark_duplicates(files)
    series = summarize_series(files, rules, max_image_mb)
    series = select_series(series, rules)
    return files, join_labels(series, read_labels(labels), labels)


def _index_sheet(
    sheet_path: str | os.PathLike, spec: InputSpec, labels: LabelSpec, max_image_mb: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(files, series) of a NIfTI cohort sheet. Its label column gives the labels when
    ``labels.path`` is null; a labels sheet, when set, replaces them at the manifest."""
    from radflow import nifti_input
    from radflow.sheet import read_sheet

    files, series = nifti_input.index_sheet(read_sheet(sheet_path, labels), spec, max_image_mb)
    if labels.path:
        series = join_labels(series, read_labels(labels), labels)
    return files, series


def _write_outputs(
    files: pd.DataFrame,
    series: pd.DataFrame,
    salt: str,
    root: str | os.PathLike,
    out_dir: Path,
    private_dir: Path,
) -> pd.DataFrame:
    """Pseudonyms, then the inventory, rejected files, id map and file lists (both formats)."""
    series = series.copy()
    series["flags"] = [flags(r) for _, r in series.iterrows()]
    series = add_pseudonyms(series, salt)
    public, id_map = split_private(series)
    public = public.sort_values(["subject_id", "study_id", "series_number"], kind="stable")
    write_table(public, out_dir / "series.csv", str(out_dir / "series.parquet"))
    _write_rejected(files, series, salt, root, out_dir, private_dir)
    write_table(
        id_map.sort_values(["subject_id", "study_id", "series_id"]),
        private_dir / _in_private(paths.ID_MAP),
        str(private_dir / _in_private(paths.ID_MAP_PARQUET)),
    )
    _write_filelists(files, series, private_dir / Path(_in_private(paths.FILE_LIST)).parent)
    return public


def _text_key(path: str) -> str:
    """A path as valid text: bytes that are not UTF-8 (surrogates) backslash-escaped."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


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
    rel = [_text_key(os.path.relpath(p, raw_dir)) for p in bad["path"]]
    bad["file_id"] = [
        ids.pseudonym("series", f"file:{r}", salt).replace("ser-", "file-") for r in rel
    ]
    # a file of a series (its key, else the UID a non-image object names), never of a blank
    bad["series_id"] = [
        ids.pseudonym("series", k if isinstance(k, str) and k else s, salt)
        if (isinstance(k, str) and k) or (isinstance(s, str) and s)
        else ""
        for k, s in zip(bad["series_key"], bad["SeriesInstanceUID"], strict=True)
    ]
    bad["extension"] = [ids.sanitize(Path(r).suffix.lstrip(".") or "none", 16) for r in rel]
    bad["size_bytes"] = pd.array([_size(p) for p in bad["path"]], dtype="Int64")
    # the error text never carries header values nor the path (pydicom's and the OS's messages
    # can quote it): it is scrubbed where it is made and once more here. The reasons of
    # DICOMDIRs and non-image objects are made of fixed words, a checked UID and a CS code
    # only, and a scrub would blank their own words (a DICOMDIR is a file named "DICOMDIR")
    bad["error"] = [
        e if k in dicomsafe.NON_IMAGE_KINDS else dicomsafe.scrub(e, p, r, _text_key(p))
        for e, p, r, k in zip(bad["error"], bad["path"], rel, bad["kind"], strict=True)
    ]
    public = bad[["file_id", "series_id", "extension", "size_bytes", "error"]]
    write_table(public, out_dir / "rejected_files.csv")
    private = bad.assign(relative_path=rel)[["file_id", "series_id", "relative_path", "error"]]
    write_table(private, private_dir / _in_private(paths.REJECTED_FILES_PRIVATE))


def _write_filelists(files: pd.DataFrame, series: pd.DataFrame, dest: Path) -> None:
    """One JSON list per selected case of its instances' paths (private: raw paths).

    JSON, not lines: a file name may hold a newline, trailing spaces or bytes that are not
    UTF-8 (kept as escaped lone surrogates by ``ensure_ascii``, which ``json.load`` and ``open``
    round-trip). Byte-identical copies of an instance are listed once.
    """
    dest.mkdir(parents=True, exist_ok=True)
    good = files[usable(files)]
    by_series = {k: g["path"] for k, g in good.groupby("series_key")}
    name = Path(paths.FILE_LIST).name
    wanted = set()
    for _, r in series[series["selected"]].iterrows():
        target = dest / name.format(case=r["case_id"])
        wanted.add(target.name)
        text = json.dumps(sorted(by_series[r["series_key"]]), ensure_ascii=True, indent=0)
        text += "\n"
        # unchanged lists keep their mtime, so re-ingesting does not re-trigger conversions
        if not target.exists() or target.read_text() != text:
            write_text(target, text)
    suffix = Path(name).suffix
    for stale in dest.iterdir():
        # lists of cases no longer selected, and the line lists (.txt) of older versions
        if stale.suffix in (suffix, ".txt") and stale.name not in wanted and stale.is_file():
            stale.unlink()


def summary(inventory: pd.DataFrame) -> str:
    """What ingest found: series, studies, subjects, cases, and the reason codes."""
    n_sel = int(inventory["selected"].sum())
    head = (
        f"{len(inventory)} series in {inventory['study_id'].nunique()} studies of "
        f"{inventory['subject_id'].nunique()} subjects; {n_sel} selected as cases"
    )
    return head + "\n" + inventory.groupby("reason_code").size().to_string()
