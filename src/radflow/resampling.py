"""Resampling between grids in world coordinates (scipy), sliced into slabs on threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage


def resample(
    vol: np.ndarray,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    order: int = 1,
    fill: float = -1024.0,
    threads: int = 1,
    slab: int = 16,
    dtype: type = np.int16,
) -> np.ndarray:
    """Resample ``vol`` onto a target grid (world coordinates preserved).

    ``dtype`` int16 (HU, labels: rounded and clipped) or a float type (CAMs: kept as is).
    """
    m = np.linalg.inv(affine) @ target_affine  # target voxel -> source voxel
    src = vol
    if order > 1:
        src = ndimage.spline_filter(vol, order=order, output=np.float32)
    out = np.empty(target_shape, dtype=dtype, order="F")
    as_int = np.issubdtype(np.dtype(dtype), np.integer)

    def work(z0: int) -> None:
        nz = min(slab, target_shape[2] - z0)
        off = m[:3, :3] @ np.array([0.0, 0.0, z0]) + m[:3, 3]
        res = ndimage.affine_transform(
            src,
            m[:3, :3],
            offset=off,
            output_shape=(*target_shape[:2], nz),
            output=np.float32,
            order=order,
            mode="constant",
            cval=fill,
            prefilter=False,
        )
        if as_int:
            res = np.clip(np.rint(res), -32768, 32767)
        out[:, :, z0 : z0 + nz] = res

    starts = range(0, target_shape[2], slab)
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, starts))
    else:
        for z0 in starts:
            work(z0)
    return out
