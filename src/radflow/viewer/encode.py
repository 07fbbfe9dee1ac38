"""Volumes of the review page as gzipped NIfTI-1 in base64, the form NiiVue reads from a string.

Each volume gets a fresh header with its geometry only (qform = sform = the affine, code 1): no
description, intent name or file name of an input can reach the page.
"""

from __future__ import annotations

import base64
import gzip

import nibabel as nib
import numpy as np

GZIP_LEVEL = 6  # on noisy CT, level 9 saves < 1 % at twice the time
KINDS = ("ct", "cam", "label")


def nifti_image(data: np.ndarray, affine: np.ndarray, kind: str) -> nib.Nifti1Image:
    """The page's NIfTI of one volume.

    ``ct``: HU as int16 (clipped to its range); ``cam``: values in [0, 1] stored as uint8 with
    the slope nibabel chooses (about 1/255); ``label``: a 0/1 uint8 mask with the NIfTI label
    intent (NiiVue draws it as an outline).
    """
    if kind == "ct":
        vox = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    elif kind == "cam":
        vox = np.clip(np.nan_to_num(np.asarray(data, np.float32), nan=0.0), 0.0, 1.0)
    elif kind == "label":
        vox = (np.asarray(data) != 0).astype(np.uint8)
    else:
        raise ValueError(f"unknown volume kind {kind!r}: one of {KINDS}")
    img = nib.Nifti1Image(vox, np.asarray(affine, dtype=float))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    hdr = img.header
    if kind == "cam":  # nibabel scales the floats to uint8 on write (slope about 1/255)
        hdr.set_data_dtype(np.uint8)
    if kind == "label":
        hdr.set_intent("label")
    hdr["cal_min"], hdr["cal_max"] = 0, 0
    return img


def nifti_base64(data: np.ndarray, affine: np.ndarray, kind: str) -> str:
    """``nifti_image`` as a gzipped NIfTI-1 stream in base64 (deterministic: no gzip time)."""
    raw = nifti_image(data, affine, kind).to_bytes()
    return base64.b64encode(gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)).decode("ascii")
