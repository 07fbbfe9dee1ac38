"""A synthetic but realistic CT cohort written as real DICOM (``radflow demo-data``).

Anatomy is analytic (ellipsoids and cylinders in patient LPS millimetres), so every series of a
study is an independent sampling of the same body on its own grid -- axial, tilted, oblique or
coronal -- and ground-truth organ and lesion masks can be drawn on any grid exactly.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from radflow import geometry
from radflow.io import save_nifti

XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
UID_ROOT = "1.2.826.0.1.3680043.8.498."

# Ground-truth label ids are TotalSegmentator's ``total`` task ids, so a demo mask reads like a
# TotalSegmentator output (and can stand in for one with segment.backend: precomputed).
ORGAN_LABELS: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    5: "liver",
    11: "lung_lower_lobe_left",
    14: "lung_lower_lobe_right",
    28: "vertebrae_L4",
    29: "vertebrae_L3",
    30: "vertebrae_L2",
    31: "vertebrae_L1",
    32: "vertebrae_T12",
    33: "vertebrae_T11",
    52: "aorta",
}
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft": 30.0,
    "lung": -850.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney": 150.0,
    "aorta": 180.0,
    "bone": 350.0,
    "disc": 80.0,
}
VENDORS = [
    # manufacturer, model, soft kernel, bone kernel
    ("SIEMENS", "SOMATOM Definition AS", "B30f", "B70f"),
    ("GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD", "BONE"),
    ("Philips", "Brilliance 64", "B", "D"),
    ("TOSHIBA", "Aquilion ONE", "FC18", "FC30"),
]
FIRST = ["JANE", "JOHN", "MARIA", "WEI", "AHMED", "OLGA", "PIERRE", "AIKO", "LUIS", "GRACE"]
LAST = ["DOE", "SMITH", "GARCIA", "CHEN", "KHAN", "IVANOVA", "MARTIN", "TANAKA", "SILVA", "OKAFOR"]


@dataclass(frozen=True)
class Blob:
    """A focal lesion or cyst: an ellipsoid (LPS mm, rotated) with optional extra lobes.

    ``lobes`` are spheres ``(dx, dy, dz, radius)`` in the ellipsoid's own frame, so a lesion can
    be round, oval or lobulated. ``hu`` is a contrast for liver lesions (added to the
    parenchyma) and an absolute value for cysts.
    """

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # row-major 3x3
    hu: float = 0.0
    lobes: tuple[tuple[float, float, float, float], ...] = ()

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of the points (..., 3) inside the blob."""
        out = np.zeros(points.shape[:-1], dtype=bool)
        d = points - np.asarray(self.center)
        near = np.einsum("...i,...i->...", d, d) <= self.extent() ** 2  # cheap bounding sphere
        if not near.any():
            return out
        rot = np.asarray(self.rotation, dtype=float).reshape(3, 3)
        d = d[near] @ rot.T  # into the blob's frame
        inside = np.sum((d / np.asarray(self.radii)) ** 2, axis=-1) <= 1
        for dx, dy, dz, r in self.lobes:
            inside |= np.sum((d - np.array([dx, dy, dz])) ** 2, axis=-1) <= r * r
        out[near] = inside
        return out

    def extent(self) -> float:
        """Radius (mm) of a sphere about ``center`` that holds the whole blob."""
        lobes = [float(np.linalg.norm(lb[:3])) + lb[3] for lb in self.lobes]
        return max([*self.radii, *lobes])


@dataclass(frozen=True)
class Phantom:
    """One subject's anatomy (LPS mm), parenchymal texture, vessels, lesions and cysts."""

    scale: float = 1.0
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # the simple lesion: a sphere in the liver (kept for the phantom segmentation model's data)
    lesion_center: tuple[float, float, float] | None = None
    lesion_radius_mm: float = 10.0
    lesion_contrast_hu: float = -50.0
    # focal liver lesions (contrast relative to the parenchyma), drawn inside the liver only
    lesions: tuple[Blob, ...] = ()
    # hypodense cysts outside the liver (absolute HU), drawn inside their organ only
    cysts: tuple[Blob, ...] = ()
    # enhancing intrahepatic vessels: (start, end) in local mm, radius mm, HU above the liver
    vessels: tuple[
        tuple[tuple[float, float, float], tuple[float, float, float], float, float], ...
    ] = ()
    # spatially correlated parenchymal texture (sd in HU; 0 = none) from a seeded noise field
    texture_hu: float = 0.0
    texture_seed: int = 0

    def _local(self, p: np.ndarray) -> np.ndarray:
        return (p - np.asarray(self.shift)) / self.scale

    def labels(self, points: np.ndarray) -> np.ndarray:
        """Organ label id (see ORGAN_LABELS; 0 = none) at LPS points (..., 3)."""
        q = self._local(points)
        x, y, z = q[..., 0], q[..., 1], q[..., 2]
        lab = np.zeros(q.shape[:-1], dtype=np.uint8)
        body = (x / 150) ** 2 + (y / 110) ** 2 <= 1
        for sign, lid in ((-1, 14), (1, 11)):  # right lung at -x (LPS), left at +x
            lab[_ellipsoid(q, (sign * 75, 10, 110), (55, 70, 90)) & body] = lid
        lab[_ellipsoid(q, (-60, -5, 0), (80, 75, 65))] = 5
        lab[_ellipsoid(q, (85, 40, 10), (30, 45, 50))] = 1
        lab[_ellipsoid(q, (-65, 55, -60), (28, 28, 50))] = 2
        lab[_ellipsoid(q, (65, 55, -60), (28, 28, 50))] = 3
        lab[((x - 15) / 12) ** 2 + ((y - 35) / 12) ** 2 <= 1] = 52
        for i in range(6):  # T11 .. L4, 28 mm bodies with 8 mm discs
            zc = 40 - 36 * i
            vert = ((x / 20) ** 2 + ((y - 75) / 18) ** 2 <= 1) & (np.abs(z - zc) <= 14)
            lab[vert] = 33 - i
        return lab

    def _lesion(self, points: np.ndarray, lab: np.ndarray) -> np.ndarray:
        out = np.zeros(points.shape[:-1], dtype=bool)
        if self.lesion_center is not None:
            d = np.linalg.norm(points - np.asarray(self.lesion_center), axis=-1)
            out |= d <= self.lesion_radius_mm
        if self.lesions:
            liver = lab == 5
            pts = points[liver]
            out[liver] |= np.any([blob.contains(pts) for blob in self.lesions], axis=0)
        return out

    def lesion(self, points: np.ndarray) -> np.ndarray:
        """Boolean lesion mask at LPS points (all False for class 0)."""
        if self.lesion_center is None and not self.lesions:
            return np.zeros(points.shape[:-1], dtype=bool)
        return self._lesion(points, self.labels(points))

    def hu(self, points: np.ndarray) -> np.ndarray:
        """Noise-free HU at LPS points (..., 3); the texture is part of the anatomy."""
        q = self._local(points)
        x, y = q[..., 0], q[..., 1]
        out = np.full(q.shape[:-1], HU["air"], dtype=np.float32)
        out[(x / 150) ** 2 + (y / 110) ** 2 <= 1] = HU["fat"]
        out[(x / 135) ** 2 + (y / 95) ** 2 <= 1] = HU["soft"]
        lab = self.labels(points)
        has = lab > 0
        out[has] = _HU_LUT[lab[has]]
        # intervertebral discs between the vertebral bodies
        disc = ((x / 20) ** 2 + ((y - 75) / 18) ** 2 <= 1) & (lab == 0)
        out[disc & (np.abs(q[..., 2]) < 260)] = HU["disc"]
        # vessels, cysts and lesions are drawn on their organ's points only (4x faster)
        liver = lab == 5
        if self.vessels:
            ql, vals = q[liver], out[liver]
            for a, b, r, dhu in self.vessels:
                vals[_segment_distance(ql, a, b) <= r] = HU["liver"] + dhu
            out[liver] = vals
        if self.cysts:
            organ = np.isin(lab, (1, 2, 3))
            po, vals = points[organ], out[organ]
            for cyst in self.cysts:
                vals[cyst.contains(po)] = cyst.hu
            out[organ] = vals
        if self.lesion_center is not None:
            out[self._lesion(points, lab)] = HU["liver"] + self.lesion_contrast_hu
        if self.lesions:
            pl, vals = points[liver], out[liver]
            for blob in self.lesions:
                vals[blob.contains(pl)] = HU["liver"] + blob.hu
            out[liver] = vals
        if self.texture_hu > 0:
            parenchyma = np.isin(lab, (1, 2, 3, 5))
            out[parenchyma] += self.texture_hu * _texture(self.texture_seed, q[parenchyma])
        return out


def _segment_distance(q: np.ndarray, a: tuple, b: tuple) -> np.ndarray:
    """Distance of points (..., 3) from the line segment a-b."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ab = b - a
    t = np.clip(((q - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(q - (a + t[..., None] * ab), axis=-1)


TEXTURE_STEP_MM = 4.0
TEXTURE_BOX_MM = np.array([[-170.0, -130.0, -220.0], [170.0, 130.0, 220.0]])


@functools.lru_cache(maxsize=4)
def _texture_field(seed: int) -> np.ndarray:
    """Unit-sd Gaussian noise smoothed to ~6 mm grain on a 4 mm grid over the body (local mm)."""
    from scipy.ndimage import gaussian_filter

    shape = tuple(
        int(n) for n in np.ceil((TEXTURE_BOX_MM[1] - TEXTURE_BOX_MM[0]) / TEXTURE_STEP_MM) + 1
    )
    field = gaussian_filter(np.random.default_rng([seed, 7919]).normal(size=shape), 1.5)
    return (field / field.std()).astype(np.float32)


def _texture(seed: int, q: np.ndarray) -> np.ndarray:
    """The subject's texture field (unit sd) at local points (n, 3), trilinear."""
    from scipy.ndimage import map_coordinates

    idx = (q - TEXTURE_BOX_MM[0]) / TEXTURE_STEP_MM
    return map_coordinates(_texture_field(seed), idx.T, order=1, mode="nearest")


def _organ_hu(name: str) -> float:
    for key in ("liver", "spleen", "kidney", "lung", "aorta"):
        if name.startswith(key):
            return HU[key]
    return HU["bone"]  # vertebrae


_HU_LUT = np.zeros(256, dtype=np.float32)
for _id, _name in ORGAN_LABELS.items():
    _HU_LUT[_id] = _organ_hu(_name)


def _ellipsoid(q: np.ndarray, c: tuple, r: tuple) -> np.ndarray:
    return (
        ((q[..., 0] - c[0]) / r[0]) ** 2
        + ((q[..., 1] - c[1]) / r[1]) ** 2
        + ((q[..., 2] - c[2]) / r[2]) ** 2
    ) <= 1


@dataclass(frozen=True)
class SeriesSpec:
    """How one series is acquired and stored."""

    number: int
    description: str
    kernel: str
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm
    thickness: float
    n_slices: int
    center: tuple[float, float, float]  # LPS centre of the stack
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0)
    step_dir: tuple[float, float, float] | None = None  # default: plane normal (no shear)
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    intercept: float = -1024.0  # 0 = signed storage, otherwise unsigned storage
    reversed_order: bool = False  # InstanceNumber runs against the z direction
    rle: bool = False
    drop_slices: tuple[int, ...] = ()
    truncate_file: int | None = None  # index of an instance whose file is cut short
    gantry_tilt_deg: float = 0.0
    noise_hu: float = 10.0
    file_ext: str = ".dcm"
    # irregular spacing: each slice's offset (mm, along the normal) from the centre, overriding
    # the regular ``thickness`` steps; n_slices must equal its length
    offsets_mm: tuple[float, ...] | None = None


@dataclass(frozen=True)
class StudySpec:
    """One study of one subject."""

    index: int
    accession: str
    date: str
    vendor: tuple[str, str, str, str]
    series: tuple[SeriesSpec, ...]
    extras: tuple[str, ...] = ()  # "sr", "non_dicom"


@dataclass(frozen=True)
class SubjectSpec:
    """One subject: identity, label, anatomy and studies."""

    index: int
    patient_id: str
    name: str
    birth_date: str
    sex: str
    label: int
    labeled: bool
    phantom: Phantom
    studies: tuple[StudySpec, ...] = field(default_factory=tuple)


def stack_positions(spec: SeriesSpec) -> np.ndarray:
    """LPS ImagePositionPatient of each slice, in spatial order (before drops/reversal)."""
    iop = np.asarray(spec.iop, dtype=float)
    n = geometry.slice_normal(iop)
    step_dir = n if spec.step_dir is None else np.asarray(spec.step_dir, dtype=float)
    step_dir = step_dir / (step_dir @ n)  # advance `thickness` along the normal per slice
    dr, dc = spec.pixel_spacing
    centre = np.asarray(spec.center, dtype=float)
    half_plane = iop[:3] * dc * (spec.cols - 1) / 2 + iop[3:] * dr * (spec.rows - 1) / 2
    if spec.offsets_mm is not None:
        if len(spec.offsets_mm) != spec.n_slices:
            raise ValueError("offsets_mm needs one offset per slice (n_slices)")
        off = np.asarray(spec.offsets_mm, dtype=float)
    else:
        off = (np.arange(spec.n_slices) - (spec.n_slices - 1) / 2) * spec.thickness
    return centre - half_plane + off[:, None] * step_dir


def pixel_points(spec: SeriesSpec, ipp: np.ndarray, along_normal: float = 0.0) -> np.ndarray:
    """LPS coordinates (rows, cols, 3) of every pixel centre of one slice."""
    iop = np.asarray(spec.iop, dtype=float)
    dr, dc = spec.pixel_spacing
    r = np.arange(spec.rows)[:, None, None]
    c = np.arange(spec.cols)[None, :, None]
    n = geometry.slice_normal(iop)
    return ipp + c * dc * iop[:3] + r * dr * iop[3:] + along_normal * n


def render_slice(
    phantom: Phantom, spec: SeriesSpec, ipp: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """HU image (rows, cols) of one slice, averaged over the slice thickness, with noise."""
    n_sub = max(1, int(round(spec.thickness / 1.5)))
    offsets = (np.arange(n_sub) - (n_sub - 1) / 2) * spec.thickness / n_sub
    img = np.mean([phantom.hu(pixel_points(spec, ipp, o)) for o in offsets], axis=0)
    img = img + rng.normal(0.0, spec.noise_hu, img.shape)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int32)


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts]))


def _patient_study(ds: Dataset, subj: SubjectSpec, study: StudySpec, study_uid: str) -> None:
    ds.PatientName = subj.name
    ds.PatientID = subj.patient_id
    ds.PatientBirthDate = subj.birth_date
    ds.PatientSex = subj.sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study.date
    ds.StudyTime = "101500"
    ds.StudyID = str(study.index + 1)
    ds.AccessionNumber = study.accession
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.InstitutionName = "Demo General Hospital"
    ds.Manufacturer = study.vendor[0]
    ds.ManufacturerModelName = study.vendor[1]


def _file_meta(sop_class: str, sop_uid: str, ts: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    return meta


def write_series(
    out_dir: Path,
    phantom: Phantom,
    spec: SeriesSpec,
    subj: SubjectSpec,
    study: StudySpec,
    study_uid: str,
    series_uid: str,
    seed: int,
) -> list[Path]:
    """Render and write one series as single-frame CT DICOM files; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, spec.number])
    positions = stack_positions(spec)
    keep = [k for k in range(spec.n_slices) if k not in spec.drop_slices]
    order = keep[::-1] if spec.reversed_order else keep
    signed = spec.intercept == 0
    derived = "DERIVED" in spec.image_type
    sop_class = SecondaryCaptureImageStorage if "SECONDARY" in spec.image_type else CTImageStorage
    files = []
    for inst, k in enumerate(order, start=1):
        hu = render_slice(phantom, spec, positions[k], rng)
        stored = hu - spec.intercept
        sop_uid = _uid(series_uid, inst)
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class, sop_uid, ExplicitVRLittleEndian)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "CT"
        _patient_study(ds, subj, study, study_uid)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = spec.number
        ds.SeriesDescription = spec.description
        ds.ImageType = list(spec.image_type)
        ds.ConvolutionKernel = spec.kernel
        ds.KVP = 120
        ds.SliceThickness = spec.thickness
        ds.SpacingBetweenSlices = spec.thickness
        ds.GantryDetectorTilt = spec.gantry_tilt_deg
        ds.FrameOfReferenceUID = _uid(study_uid, "for")
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [round(float(v), 4) for v in positions[k]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in spec.iop]
        ds.SliceLocation = round(float(positions[k][2]), 4)
        ds.PixelSpacing = list(spec.pixel_spacing)
        ds.Rows, ds.Columns = spec.rows, spec.cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16 if (signed or spec.intercept < -1024) else 12
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleIntercept = spec.intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        if derived:
            ds.DerivationDescription = "multiplanar reformat"
        arr = stored.astype(np.int16 if signed else np.uint16)
        ds.PixelData = arr.tobytes()
        if spec.rle:
            ds.compress(RLELossless, arr, generate_instance_uid=False)
        path = out_dir / f"IM{inst:05d}{spec.file_ext}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    if spec.truncate_file is not None and files:
        victim = files[min(spec.truncate_file, len(files) - 1)]
        size = victim.stat().st_size
        with open(victim, "r+b") as fh:
            fh.truncate(size // 2)
    return files


def write_dose_sr(path: Path, subj: SubjectSpec, study: StudySpec, study_uid: str) -> None:
    """A non-image object (radiation dose structured report) as scanners store beside images."""
    series_uid = _uid(study_uid, "sr")
    sop_uid = _uid(series_uid, 1)
    ds = Dataset()
    ds.file_meta = _file_meta(XRAY_DOSE_SR, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = XRAY_DOSE_SR
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "SR"
    _patient_study(ds, subj, study, study_uid)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 999
    ds.SeriesDescription = "Dose Report"
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue = "113701"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [concept]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- cohort plan


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo cohort (all deterministic given ``seed``)."""

    # 44 labelled subjects, half with liver lesions: with the demo's 50/25/25 split, 11
    # subjects with a lesion are held out (validation + test)
    n_subjects: int = 45
    n_unlabeled: int = 1
    # every k-th subject has a second study (follow-up): subjects with several cases; 0 = none
    second_study_every: int = 5
    seed: int = 42
    matrix: int = 96
    # 186 mm centred 25 mm below the liver centre: the liver (130-140 mm tall), spleen and
    # kidneys fit, and at TotalSegmentator's 3 mm the image stays <= 64 slices: one tile of
    # its 64^3 patch along z instead of two (half the segmentation time)
    z_extent_mm: float = 186.0
    z_center_mm: float = -25.0
    # class 1: 1-2 liver lesions, equivalent radius and contrast drawn from these ranges, round,
    # oval or lobulated; ``subtle_fraction`` of them at the faint end of the contrast range.
    # Sized for the demo's ~22 training cases at 6 mm voxels: with radii from 7 mm and 25%
    # subtle (-18 to -30 HU) no network learnt the lesion (held-out AUC 0.5-0.6, Grad-CAM on the
    # organ's outline); from 12 mm, mostly conspicuous, a slim 3D ResNet does (docs/demo.md).
    lesion_radius_mm: tuple[float, float] = (12.0, 20.0)
    lesion_contrast_hu: tuple[float, float] = (-100.0, -60.0)
    subtle_fraction: float = 0.15
    subtle_contrast_hu: tuple[float, float] = (-40.0, -25.0)
    second_lesion_fraction: float = 0.25
    # both classes: water-density cysts in the right kidney (next to the liver: inside its
    # crop, outside its mask) or the spleen, so "any dark blob" does not give the class away
    cyst_fraction: float = 0.6
    cyst_radius_mm: tuple[float, float] = (6.0, 13.0)
    # both classes: correlated parenchymal texture (sd, HU) and 3-6 enhancing liver vessels
    texture_hu: float = 8.0
    vessels: tuple[int, int] = (3, 6)
    thin_mm: tuple[float, ...] = (1.5, 2.0, 2.5)
    thick_mm: float = 5.0
    noise_hu: float = 10.0


LIVER = ((-60.0, -5.0, 0.0), (80.0, 75.0, 65.0))  # local centre and semi-axes (mm)
CYST_SITES = {  # organ label: local centre and semi-axes of the region a cyst centre is drawn in
    2: ((-65.0, 55.0, -35.0), (12.0, 12.0, 18.0)),  # right kidney, upper pole (near the liver)
    1: ((85.0, 40.0, 10.0), (12.0, 22.0, 25.0)),  # spleen
}


def _rotation(rng: np.random.Generator) -> tuple[float, ...]:
    """A random rotation matrix (row-major), from a normalised quaternion."""
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    m = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return tuple(float(v) for v in np.asarray(m).ravel())


def _inside(local: np.ndarray, centre: tuple, axes: tuple, margin: float) -> bool:
    """Is the sphere of ``margin`` mm about ``local`` inside the ellipsoid (approximately)?"""
    shrunk = np.asarray(axes) - margin
    return bool(np.all(shrunk > 0) and np.sum(((local - centre) / shrunk) ** 2) <= 1)


def plan_lesion(
    s: DemoSettings, rng: np.random.Generator, scale: float, shift: tuple, subtle: bool
) -> Blob:
    """One liver lesion: size, contrast and shape drawn from the settings, placed inside the
    liver at least 6 mm from its surface (world LPS mm)."""
    r = float(rng.uniform(*s.lesion_radius_mm))
    contrast = float(rng.uniform(*(s.subtle_contrast_hu if subtle else s.lesion_contrast_hu)))
    shape = rng.choice(["round", "oval", "lobulated"], p=[0.35, 0.35, 0.3])
    radii = (r, r, r)
    lobes: tuple = ()
    if shape == "oval":
        a = float(rng.uniform(1.2, 1.6))
        radii = (r * a, r / np.sqrt(a), r / np.sqrt(a))
    elif shape == "lobulated":
        n = int(rng.integers(1, 3))
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lobes = tuple(
            (*(float(v) for v in d * r * rng.uniform(0.6, 0.9)), float(r * rng.uniform(0.5, 0.75)))
            for d in dirs
        )
    blob = Blob((0.0, 0.0, 0.0), radii, _rotation(rng), contrast, lobes)
    centre, axes = LIVER
    for _ in range(1000):
        local = np.asarray(centre) + rng.uniform(-1, 1, 3) * np.asarray(axes)
        if _inside(local, centre, axes, blob.extent() / scale + 6.0):
            break
    world = tuple(float(v) for v in local * scale + np.asarray(shift))
    return replace(blob, center=world, radii=tuple(float(v) for v in blob.radii))


def plan_cyst(s: DemoSettings, rng: np.random.Generator, scale: float, shift: tuple) -> Blob:
    """A water-density cyst in the right kidney's upper pole or in the spleen (world LPS mm)."""
    organ = int(rng.choice(sorted(CYST_SITES)))
    centre, axes = CYST_SITES[organ]
    local = np.asarray(centre) + rng.uniform(-1, 1, 3) * np.asarray(axes)
    world = tuple(float(v) for v in local * scale + np.asarray(shift))
    r = float(rng.uniform(*s.cyst_radius_mm))
    return Blob(
        world, (r, r, r * float(rng.uniform(0.8, 1.2))), _rotation(rng), float(rng.uniform(0, 15))
    )


def plan_vessels(s: DemoSettings, rng: np.random.Generator) -> tuple:
    """Enhancing vessels fanning out from the liver hilum (local mm; HU above the liver)."""
    hilum = np.array([-35.0, 5.0, -10.0])
    centre, axes = LIVER
    out = []
    for _ in range(int(rng.integers(s.vessels[0], s.vessels[1] + 1))):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        end = np.asarray(centre) + d * np.asarray(axes) * rng.uniform(0.5, 0.85)
        out.append(
            (
                tuple(float(v) for v in hilum),
                tuple(float(v) for v in end),
                float(rng.uniform(2.5, 4.5)),
                float(rng.uniform(40, 70)),
            )
        )
    return tuple(out)


def plan_cohort(s: DemoSettings) -> list[SubjectSpec]:
    """Decide every subject, study and series of the cohort (pure; no I/O)."""
    subjects = []
    study_counter = 0
    for i in range(s.n_subjects):
        rng = np.random.default_rng([s.seed, i])
        label = int(i % 2)
        scale = float(rng.uniform(0.92, 1.08))
        shift = (float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8)), float(rng.uniform(-10, 10)))
        # anatomy first, from its own stream, so both classes draw it alike
        anat = np.random.default_rng([s.seed, i, 1])
        vessels = plan_vessels(s, anat)
        cysts = ()
        if anat.random() < s.cyst_fraction:
            cysts = tuple(plan_cyst(s, anat, scale, shift) for _ in range(int(anat.integers(1, 3))))
        lesions = ()
        if label:
            les = np.random.default_rng([s.seed, i, 2])
            n = 2 if les.random() < s.second_lesion_fraction else 1
            subtle = les.random() < s.subtle_fraction
            lesions = tuple(plan_lesion(s, les, scale, shift, subtle and k == 0) for k in range(n))
        phantom = Phantom(
            scale,
            shift,
            lesions=lesions,
            cysts=cysts,
            vessels=vessels,
            texture_hu=s.texture_hu,
            texture_seed=int(s.seed * 1000 + i),
        )
        first, last = FIRST[i % len(FIRST)], LAST[(i * 3) % len(LAST)]
        pid = "../../etc" if i == 5 else f"MRN{100200 + 37 * i:07d}"
        n_studies = 2 if s.second_study_every and i % s.second_study_every == 0 else 1
        studies = []
        for st in range(n_studies):
            j = study_counter
            study_counter += 1
            studies.append(_plan_study(s, rng, j, st, phantom))
        subjects.append(
            SubjectSpec(
                index=i,
                patient_id=pid,
                name=f"{last}^{first}",
                birth_date=f"19{40 + (i * 7) % 50:02d}{1 + i % 12:02d}{1 + (i * 5) % 28:02d}",
                sex="F" if i % 3 else "M",
                label=label,
                labeled=i < s.n_subjects - s.n_unlabeled,
                phantom=phantom,
                studies=tuple(studies),
            )
        )
    return subjects


def _plan_study(
    s: DemoSettings, rng: np.random.Generator, j: int, st: int, phantom: Phantom
) -> StudySpec:
    vendor = VENDORS[j % len(VENDORS)]
    # 340-345 mm: the body (up to 340 mm wide) fits, and at TotalSegmentator's 3 mm the
    # image stays <= 115 voxels across: 2 tiles of its 64^3 patch per axis instead of 3
    fov = float(rng.uniform(340, 345))
    m = s.matrix
    ps = round(fov / m, 4)
    thin = s.thin_mm[j % len(s.thin_mm)]
    zc = s.z_center_mm + phantom.shift[2]
    n_thin = int(s.z_extent_mm // thin)
    intercept = {0: 0.0, 1: -1024.0, 2: -1024.0}[j % 3]
    if j in (7, 8):
        intercept = -8192.0
    base = SeriesSpec(
        number=2,
        description=f"Abdomen {thin:.1f}mm",
        kernel=vendor[2],
        rows=m,
        cols=m,
        pixel_spacing=(ps, ps),
        thickness=thin,
        n_slices=n_thin,
        center=(0.0, 0.0, zc),
        intercept=intercept,
        reversed_order=bool(j % 2),
        noise_hu=s.noise_hu,
        file_ext="" if j % 5 == 4 else ".dcm",
    )
    thin_spec = base
    if j == 1:  # gantry-tilted acquisition: image plane tilted, table steps along z
        t = np.radians(12.0)
        thin_spec = replace(
            base,
            iop=(1, 0, 0, 0, float(np.cos(t)), float(-np.sin(t))),
            step_dir=(0, 0, 1),
            gantry_tilt_deg=12.0,
        )
    elif j == 2:
        thin_spec = replace(base, rle=True)
    elif j == 3:
        thin_spec = replace(base, drop_slices=(n_thin // 2,))
    series = [
        SeriesSpec(  # localizer: one coronal projection-like image
            number=1,
            description="Topogram 0.6",
            kernel="T20f",
            rows=m,
            cols=m,
            pixel_spacing=(round(s.z_extent_mm * 1.6 / m, 4), ps),
            thickness=1.0,
            n_slices=1,
            center=(0.0, 0.0, zc),
            iop=(1, 0, 0, 0, 0, -1),
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            intercept=-1024.0,
        ),
        thin_spec,
        replace(  # thick soft-kernel axial
            base,
            number=3,
            description=f"Abdomen {s.thick_mm:.1f}mm",
            thickness=s.thick_mm,
            n_slices=int(s.z_extent_mm // s.thick_mm),
            truncate_file=3 if j == 4 else None,
            rle=False,
            noise_hu=s.noise_hu / 2,
            drop_slices=(),
        ),
    ]
    if j % 3 == 0:  # thin bone-kernel axial: eligible, not preferred
        series.append(replace(base, number=4, description=f"Bone {thin:.1f}mm", kernel=vendor[3]))
    if j % 4 == 1:  # coronal multiplanar reformat
        series.append(
            replace(
                base,
                number=5,
                description="Cor MPR 3mm",
                iop=(1, 0, 0, 0, 0, -1),
                image_type=("DERIVED", "SECONDARY", "REFORMATTED"),
                thickness=3.0,
                n_slices=int(220 // 3.0),  # the body is 220 mm front to back
                rows=int(s.z_extent_mm // ps),
                center=(0.0, 0.0, zc),
                reversed_order=False,
            )
        )
    if j == 6:  # oblique acquisition: rotated 35 degrees about the LR axis
        t = np.radians(35.0)
        series.append(
            replace(
                base,
                number=6,
                description="Oblique 2.0mm",
                iop=(1, 0, 0, 0, float(np.cos(t)), float(-np.sin(t))),
                thickness=2.0,
                n_slices=int(s.z_extent_mm // 2.0),
            )
        )
    extras = []
    if j % 3 == 2:
        extras.append("sr")
    if j == 5:
        extras.append("non_dicom")
    year = 2019 + (j % 5)
    return StudySpec(
        index=st,
        accession=f"ACC{int(rng.integers(10**6, 10**7))}",
        date=f"{year}{1 + j % 12:02d}{1 + j % 27:02d}",
        vendor=vendor,
        series=tuple(series),
        extras=tuple(extras),
    )


def _folder(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_") or "x"


def _write_study(args: tuple) -> dict:
    raw_dir, truth_dir, subj, st, seed = args
    study = subj.studies[st]
    study_uid = _uid(seed, subj.index, st, "study")
    study_dir = (
        raw_dir
        / f"{_folder(subj.name)}_{_folder(subj.patient_id)}"
        / f"{study.date}_{study.accession}"
    )
    thin = next(sp for sp in study.series if sp.number == 2)
    for spec in study.series:
        series_uid = _uid(study_uid, spec.number)
        write_series(
            study_dir / f"{spec.number:03d}_{_folder(spec.description)}",
            subj.phantom,
            spec,
            subj,
            study,
            study_uid,
            series_uid,
            seed=seed * 100_000 + subj.index * 10 + st,
        )
    if "sr" in study.extras:
        write_dose_sr(study_dir / "999_Dose_Report" / "SR00001.dcm", subj, study, study_uid)
    if "non_dicom" in study.extras:
        (study_dir / "002_Abdomen_notes.txt").write_text("exported by PACS viewer v2.1\n")
        (study_dir / "Thumbs.db").write_bytes(bytes(range(256)) * 4)
    _write_truth(truth_dir / study_uid, subj.phantom, thin)
    return {"PatientID": subj.patient_id, "StudyInstanceUID": study_uid, "label": subj.label}


def _write_truth(out: Path, phantom: Phantom, thin: SeriesSpec) -> None:
    """Ground-truth organ label map and lesion mask on an axis-aligned RAS grid."""
    ps = thin.pixel_spacing[1]
    spacing = np.array([ps, ps, thin.thickness])
    shape = (thin.cols, thin.rows, thin.n_slices)
    centre_ras = geometry.lps_to_ras(np.asarray(thin.center, dtype=float))
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = centre_ras - spacing * (np.asarray(shape) - 1) / 2
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    lps = geometry.lps_to_ras(geometry.voxel_to_world(aff, ijk))  # RAS->LPS is the same flip
    out.mkdir(parents=True, exist_ok=True)
    save_nifti(phantom.labels(lps).astype(np.uint8), aff, out / "organs.nii.gz")
    save_nifti(phantom.lesion(lps).astype(np.uint8), aff, out / "lesion.nii.gz")
    (out / "organs.json").write_text(json.dumps({str(k): v for k, v in ORGAN_LABELS.items()}))


def make_cohort(out_dir: str | os.PathLike, settings: DemoSettings, workers: int = 1) -> Path:
    """Write the demo cohort to ``out_dir`` (raw/, ground_truth/, labels.csv) atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    raw, truth = tmp / "raw", tmp / "ground_truth"
    subjects = plan_cohort(settings)
    jobs = [
        (raw, truth, subj, st, settings.seed)
        for subj in subjects
        for st in range(len(subj.studies))
    ]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(_write_study, jobs))
    else:
        rows = [_write_study(j) for j in jobs]
    labeled = {s.patient_id for s in subjects if s.labeled}
    with open(tmp / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "label"])
        for subj in subjects:
            if subj.patient_id in labeled:
                w.writerow([subj.patient_id, subj.label])
    with open(tmp / "studies.csv", "w", newline="") as fh:  # demo key: study -> truth folder
        w = csv.DictWriter(fh, fieldnames=["PatientID", "StudyInstanceUID", "label"])
        w.writeheader()
        w.writerows(rows)
    (tmp / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    from radflow.segment import DEMO_MARKER  # lets the phantom weights run on this cohort

    marker = {"radflow_demo": True, "raw": raw.name, "note": "synthetic cohort, no real data"}
    (tmp / DEMO_MARKER).write_text(json.dumps(marker, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
