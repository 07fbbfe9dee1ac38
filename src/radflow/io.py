"""I/O at the edges: atomic writes, NIfTI helpers, JSON sidecars."""

from __future__ import annotations

import contextlib
import json
import os
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


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


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


def write_table(
    df: pd.DataFrame, csv_path: str | os.PathLike, parquet_path: str | None = None
) -> None:
    """Write a DataFrame as CSV (and Parquet when a path is given), each atomically."""
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    if parquet_path is not None:
        with atomic_path(parquet_path) as tmp:
            df.to_parquet(tmp, index=False)


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
