"""Pure geometry of DICOM series and NIfTI grids (no file I/O; testable with plain arrays).

Conventions: DICOM patient coordinates are LPS (+x left, +y posterior, +z head); NIfTI world
coordinates here are RAS (+x right... i.e. x_ras = -x_lps, y_ras = -y_lps, z_ras = z_lps).
``ImageOrientationPatient`` = (row direction, column direction): the first triple is the
direction in which the column index grows, the second the direction in which the row index grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_AXES = {0: "sagittal", 1: "coronal", 2: "axial"}


def slice_normal(iop: np.ndarray) -> np.ndarray:
    """Unit normal of the image plane (row direction x column direction), in LPS."""
    iop = np.asarray(iop, dtype=float)
    n = np.cross(iop[:3], iop[3:6])
    return n / np.linalg.norm(n)


def plane_orientation(iop: np.ndarray, tolerance_deg: float) -> tuple[str, float]:
    """Classify an image plane as axial/coronal/sagittal, or oblique beyond ``tolerance_deg``.

    Returns (label, angle in degrees between the plane normal and the nearest patient axis).
    """
    n = np.abs(slice_normal(iop))
    axis = int(np.argmax(n))
    angle = float(np.degrees(np.arccos(np.clip(n[axis], -1.0, 1.0))))
    return (_AXES[axis] if angle <= tolerance_deg else "oblique"), angle


def project_positions(ipps: np.ndarray, iop: np.ndarray) -> np.ndarray:
    """Signed distance of each slice position along the plane normal (mm)."""
    return np.asarray(ipps, dtype=float).reshape(-1, 3) @ slice_normal(iop)


@dataclass(frozen=True)
class SliceSpacing:
    """Spacing between consecutive slices along the normal, after sorting by position."""

    step_mm: float  # the regular step (median of the steps)
    uniform: bool  # every step within tolerance of the regular step
    missing: int  # number of slices missing in gaps that are whole multiples of the step
    irregular: bool  # a step that is neither the regular step nor a multiple of it
    duplicates: int  # slices at (nearly) the same position


def slice_spacing(positions: np.ndarray, rtol: float = 0.05, atol: float = 0.1) -> SliceSpacing:
    """Describe the slice spacing of positions along the normal (order does not matter)."""
    pos = np.sort(np.asarray(positions, dtype=float))
    if pos.size < 2:
        return SliceSpacing(0.0, True, 0, False, 0)
    steps = np.diff(pos)
    dup = int(np.sum(steps <= atol))
    steps = steps[steps > atol]
    if steps.size == 0:
        return SliceSpacing(0.0, False, 0, True, dup)
    step = float(np.median(steps))
    ratio = steps / step
    nearest = np.rint(ratio)
    close = np.abs(steps - nearest * step) <= (atol + rtol * step)
    regular = close & (nearest == 1)
    gaps = close & (nearest >= 2)
    missing = int(np.sum(nearest[gaps] - 1))
    irregular = bool(np.any(~close))
    return SliceSpacing(step, bool(regular.all()) and dup == 0, missing, irregular, dup)


def gantry_tilt_deg(ipps: np.ndarray, iop: np.ndarray) -> float:
    """Angle (deg) between the slice stacking direction and the plane normal (0 = no shear).

    A gantry-tilted CT keeps stepping the table along z while the image plane is tilted, so the
    stack is sheared: this is the tilt the volume needs corrected.
    """
    p = np.asarray(ipps, dtype=float).reshape(-1, 3)
    if len(p) < 2:
        return 0.0
    order = np.argsort(project_positions(p, iop))
    step = p[order[-1]] - p[order[0]]
    norm = np.linalg.norm(step)
    if norm == 0:
        return 0.0
    cosang = abs(float(step @ slice_normal(iop))) / norm
    return float(np.degrees(np.arccos(np.clip(cosang, -1.0, 1.0))))


def series_affine_ras(
    iop: np.ndarray, first_ipp: np.ndarray, step_lps: np.ndarray, pixel_spacing: np.ndarray
) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS world affine of a sorted DICOM stack.

    ``step_lps`` is the position change from one sorted slice to the next (may be sheared).
    """
    iop = np.asarray(iop, dtype=float)
    dr, dc = (float(v) for v in pixel_spacing)
    aff = np.eye(4)
    aff[:3, 0] = iop[:3] * dc
    aff[:3, 1] = iop[3:6] * dr
    aff[:3, 2] = np.asarray(step_lps, dtype=float)
    aff[:3, 3] = np.asarray(first_ipp, dtype=float)
    return LPS_TO_RAS @ aff


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Convert LPS points (..., 3) to RAS."""
    p = np.array(points, dtype=float)
    p[..., :2] *= -1
    return p


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to voxel indices (..., 3)."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def is_axis_aligned(affine: np.ndarray, tol: float = 1e-4) -> bool:
    """True when each voxel axis runs along exactly one world axis (no obliquity or shear)."""
    m = affine[:3, :3]
    cols = m / np.linalg.norm(m, axis=0)
    return bool(np.all((np.abs(cols) < tol) | (np.abs(np.abs(cols) - 1) < tol)))


def aligned_grid(
    affine: np.ndarray, shape: tuple[int, int, int], spacing: np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Axis-aligned RAS+ grid with ``spacing`` covering every voxel centre of a source volume.

    Returns (affine, shape) of the target grid.
    """
    corners = np.array(
        [
            [i, j, k]
            for i in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for k in (0, shape[2] - 1)
        ],
        dtype=float,
    )
    world = voxel_to_world(affine, corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    spacing = np.asarray(spacing, dtype=float)
    n = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    # centre the target grid on the source extent
    origin = lo + ((hi - lo) - (n - 1) * spacing) / 2
    out = np.diag([*spacing, 1.0])
    out[:3, 3] = origin
    return out, (int(n[0]), int(n[1]), int(n[2]))


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along each voxel axis."""
    return np.linalg.norm(affine[:3, :3], axis=0)


@dataclass(frozen=True)
class StackResampling:
    """A regular grid along the slice normal for irregularly spaced slices.

    Output slice ``k`` lies at ``first + k * step_mm`` along the normal and is interpolated
    linearly between the sorted acquired slices ``lower[k]`` and ``lower[k] + 1`` with weight
    ``weight[k]`` on the upper one (the exact positions, never the nominal spacing).
    """

    step_mm: float
    n_slices: int
    lower: np.ndarray
    weight: np.ndarray
    missing: list[int]  # output slices that no acquired slice covers (beyond half a slab)
    min_gap_mm: float
    max_gap_mm: float


def regular_stack(
    positions: np.ndarray, thickness_mm: float = 0.0, rtol: float = 0.05, atol: float = 0.1
) -> StackResampling:
    """The regular grid (median step, spanning first to last slice) for sorted, distinct
    ``positions`` along the normal, and each output slice's interpolation from them.

    An output slice counts as missing when the nearest acquired slice is farther than half of
    max(slice thickness, step) (with the tolerances of ``slice_spacing``): no acquired slab
    covers it, so its values would be invented across a gap in the acquisition.
    """
    pos = np.asarray(positions, dtype=float)
    if pos.size < 2 or np.any(np.diff(pos) <= 0):
        raise ValueError("positions must be at least two, sorted and distinct")
    steps = np.diff(pos)
    step = float(np.median(steps))
    extent = float(pos[-1] - pos[0])
    n = int(round(extent / step)) + 1
    out_step = extent / (n - 1)
    t = pos[0] + np.arange(n) * out_step
    t[-1] = pos[-1]
    lower = np.clip(np.searchsorted(pos, t, side="right") - 1, 0, pos.size - 2)
    weight = np.clip((t - pos[lower]) / steps[lower], 0.0, 1.0)
    nearest = np.minimum(np.abs(t - pos[lower]), np.abs(pos[lower + 1] - t))
    half = max(float(thickness_mm), step) / 2
    missing = np.flatnonzero(nearest > half * (1 + rtol) + atol)
    return StackResampling(
        step_mm=out_step,
        n_slices=n,
        lower=lower,
        weight=weight,
        missing=[int(k) for k in missing],
        min_gap_mm=float(steps.min()),
        max_gap_mm=float(steps.max()),
    )


def line_deviation_mm(ipps: np.ndarray, positions: np.ndarray) -> float:
    """How far (mm) slice positions stray from the straight line through the first and last
    (sorted by ``positions`` along the normal): 0 for a straight, possibly tilted, stack."""
    p = np.asarray(ipps, dtype=float).reshape(-1, 3)
    s = np.asarray(positions, dtype=float)
    if len(p) < 3 or s[-1] == s[0]:
        return 0.0
    frac = (s - s[0]) / (s[-1] - s[0])
    line = p[0] + frac[:, None] * (p[-1] - p[0])
    return float(np.linalg.norm(p - line, axis=1).max())


def sidecar_geometry(
    shape: tuple[int, ...],
    affine: np.ndarray,
    resampled: bool,
    order: int,
    src_shape: tuple[int, ...],
    src_affine: np.ndarray,
) -> dict:
    """The ``geometry`` record of a converted volume's sidecar (DICOM and NIfTI alike)."""
    import nibabel as nib

    return {
        "shape": list(shape),
        "spacing_mm": [round(float(v), 6) for v in ras_spacing(affine)],
        "affine": np.round(affine, 6).tolist(),
        "orientation": "".join(nib.aff2axcodes(affine)),
        "resampled": resampled,
        "interpolation": {1: "linear", 3: "cubic"}[order] if resampled else "none",
        "source_shape": list(src_shape),
        "source_spacing_mm": [round(float(v), 6) for v in ras_spacing(src_affine)],
        "source_affine": np.round(src_affine, 6).tolist(),
    }
