"""I/O at the edges: atomic writes, NIfTI helpers, JSON sidecars."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from isal import igzip_threaded

if TYPE_CHECKING:  # pandas costs ~60 MiB of RSS; convert never needs it
    import pandas as pd

# Level 1 of ISA-L's deflate is both faster and smaller than zlib level 1 on CT int16 data.
GZIP_LEVEL = 1


# A failed write with less free space than this on the target's file system counts as disk full
# (torch.save reports a full disk as RuntimeError "unexpected pos ...", without an errno).
DISK_FULL_BYTES = 64 << 20
_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32] or "host"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success.

    The temporary is ``.{name}.{host}.{pid}.{random}.part``: temporaries of the same target left
    by dead processes of this host (``kill -9``, an out-of-memory kill) are removed first. A full
    disk is re-raised as ``OSError(ENOSPC)`` naming the target, whatever the writer raised.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    tmp_path: Path | None = None
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.{_HOST}.{os.getpid()}.", suffix=".part", dir=target.parent
        )
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException as exc:
        # free space is measured before the partial file is removed (which frees it again)
        full = isinstance(exc, Exception) and _disk_full(exc, target.parent)
        free = _free_text(target.parent) if full else ""
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        if full:
            raise OSError(
                errno.ENOSPC,
                f"no space left on device while writing {target} "
                f"({free} while writing; the partial file was removed)",
            ) from exc
        raise


def remove_orphans(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``target`` written by processes of this host that are gone."""
    target = Path(target)
    prefix = f".{target.name}."
    removed = []
    try:
        candidates = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for p in candidates:
        if not p.name.endswith(".part"):
            continue
        parts = p.name[len(prefix) : -len(".part")].split(".")
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
            continue  # another target's temporary, or another host's writer
        if _alive(int(parts[1])):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC anywhere in the exception chain, or a failure while (almost) no space is free."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def _free_text(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free >> 20} MiB free"
    except OSError:
        return "free space unknown"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (sorted keys, numpy scalars converted)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# OWASP CSV injection: a spreadsheet runs a cell starting with one of these as a formula.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def neutralise_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """A copy whose text cells that a spreadsheet would run as a formula start with ``'``.

    Only string cells change: numbers stay numbers, and so does text that is a plain number
    (``-1024``), which no spreadsheet evaluates as a formula.
    """
    from pandas.api.types import is_string_dtype

    out = df.copy()
    for col in out.columns:
        s = out[col]
        if s.dtype != object and not is_string_dtype(s.dtype):
            continue
        out[col] = s.map(_neutralise, na_action="ignore")
    return out


def _neutralise(v: Any) -> Any:
    if isinstance(v, str) and v.startswith(FORMULA_START) and not _NUMBER.fullmatch(v):
        return "'" + v
    return v


def write_table(
    df: pd.DataFrame, csv_path: str | os.PathLike, parquet_path: str | None = None
) -> None:
    """Write a DataFrame as CSV (and Parquet when a path is given), each atomically.

    The CSV is for people: formula-like text is neutralised (``neutralise_formulas``) and text
    that is not valid UTF-8 (a raw file name) is written backslash-escaped. The Parquet is for
    machines and keeps every value as it is.
    """
    with atomic_path(csv_path) as tmp:
        neutralise_formulas(df).to_csv(tmp, index=False, errors="backslashreplace")
    if parquet_path is not None:
        with atomic_path(parquet_path) as tmp:
            df.to_parquet(tmp, index=False)


def read_id_map(path: str | os.PathLike) -> pd.DataFrame:
    """The private id map as written (raw values, as strings): its Parquet when there is one.

    ``results/private/id_map.csv`` is for people (formula-like identifiers are escaped); given
    its path, the Parquet beside it is read instead when it exists.
    """
    import pandas as pd

    p = Path(path)
    pq = p if p.suffix == ".parquet" else p.with_suffix(".parquet")
    if not pq.exists():
        return pd.read_csv(p, dtype=str).fillna("")
    df = pd.read_parquet(pq)
    for col in df.columns:
        df[col] = [("" if v is None or v != v else str(v)) for v in df[col].astype(object)]
    return df


def make_nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Build a NIfTI-1 image with qform = sform = ``affine`` (code 1, scanner) and mm units."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    return img


def save_nifti(
    data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, threads: int = 1
) -> None:
    """Write a gzipped NIfTI-1 atomically with multithreaded ISA-L deflate.

    The stream is the header followed by the voxel data in Fortran order, written in slabs so no
    second copy of the volume is made. Any gzip reader (nibabel, ITK, dcm2niix) opens it.
    """
    img = make_nifti(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    offset = int(hdr["vox_offset"])
    with atomic_path(path) as tmp:
        with igzip_threaded.open(
            tmp, "wb", compresslevel=GZIP_LEVEL, threads=max(1, threads)
        ) as fh:
            hdr.write_to(fh)
            written = hdr.sizeof_hdr
            fh.write(b"\x00" * (offset - written))  # empty extension flag + padding
            _write_fortran(fh, data)


def _write_fortran(fh: Any, data: np.ndarray, slab_bytes: int = 8 << 20) -> None:
    """Write ``data`` in Fortran (NIfTI) order, one slab along the last axis at a time."""
    if data.ndim < 3:
        fh.write(np.asfortranarray(data).tobytes(order="F"))
        return
    per_slice = int(np.prod(data.shape[:-1])) * data.dtype.itemsize
    step = max(1, slab_bytes // max(per_slice, 1))
    for k in range(0, data.shape[-1], step):
        fh.write(data[..., k : k + step].tobytes(order="F"))


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
