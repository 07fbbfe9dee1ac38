"""Reconstruction kernels: each vendor's ConvolutionKernel name mapped to one class.

Classes, smooth to sharp: ``soft``, ``standard``, ``sharp``, ``bone``, plus ``lung`` (a sharp,
lung-tuned kernel) and ``unknown`` (a name no rule recognises). Pure functions, no I/O: ingest
ranks the series of a study by the class of their kernel (``ingest.selection.
preferred_kernel_classes``).

The vendor comes from the Manufacturer tag when it names one; otherwise (blank or unknown
manufacturer) each vendor's naming is tried in turn, which is unambiguous for the forms below.

- Siemens: a prefix (B body, H head, Br/Bf/Bv/Hr/Hc/Qr/Jr... regular/filtered/vascular/
  quantitative, I/J iterative) and two digits of sharpness, optional suffix (Br38f, B30f, I26f,
  Qr40d); 10-39 soft, 40-49 standard, 50-69 sharp, 70+ bone; a ``Bl``/``Hl`` prefix is lung.
  A second value (Br38f\\3: the iterative strength) is ignored.
- GE: SOFT, STANDARD, DETAIL, CHST/CHEST, LUNG, BONE, BONEPLUS, EDGE (an "HD " prefix, as in
  "HD STANDARD", is ignored).
- Philips: A, B, UA-UC (brain) soft; C standard; D, YC-YF sharp; E, EA-EC bone; L, LA-LC,
  YA, YB lung.
- Canon/Toshiba: FC01-09 soft (body), FC10-29 standard (head/body), FC30-49 bone, FC50-59
  lung, FC60+ sharp (high resolution); FL01-FL09 lung.
- United Imaging: B_SOFT_A, H_SOFT_B... soft, B_STD/B_MEDIUM standard, B_SHARP sharp,
  B_BONE bone, B_LUNG or an L_ prefix lung.
- Any vendor, as a last resort: a name containing SOFT, STANDARD/STD, SHARP/DETAIL/EDGE, BONE
  or LUNG.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

CLASSES = ("soft", "standard", "sharp", "bone", "lung")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Kernel:
    """A kernel name, the vendor whose naming it follows, and its class."""

    name: str
    vendor: str
    kernel_class: str

    @property
    def label(self) -> str:
        """``Philips B``, ``Siemens Br38f``; the bare name when no vendor is known."""
        return f"{self.vendor} {self.name}".strip() if self.name else "no kernel"


def _siemens(k: str) -> str | None:
    m = re.fullmatch(r"([A-Z][A-Z]?)(\d{2})[A-Z]?", k)
    if not m or m.group(1) in ("FC", "FL"):
        return None
    if m.group(1) in ("BL", "HL"):
        return "lung"
    n = int(m.group(2))
    if n < 40:
        return "soft"
    if n < 50:
        return "standard"
    return "sharp" if n < 70 else "bone"


_GE = {
    "SOFT": "soft",
    "STANDARD": "standard",
    "STND": "standard",
    "DETAIL": "sharp",
    "CHST": "sharp",
    "CHEST": "sharp",
    "EDGE": "bone",
    "LUNG": "lung",
    "BONE": "bone",
    "BONEPLUS": "bone",
    "BONE PLUS": "bone",
}


def _ge(k: str) -> str | None:
    return _GE.get(re.sub(r"^HD\s+", "", k))


_PHILIPS = {
    "A": "soft",
    "B": "soft",
    "UA": "soft",
    "UB": "soft",
    "UC": "soft",
    "C": "standard",
    "D": "sharp",
    "YC": "sharp",
    "YD": "sharp",
    "YE": "sharp",
    "YF": "sharp",
    "E": "bone",
    "EA": "bone",
    "EB": "bone",
    "EC": "bone",
    "L": "lung",
    "LA": "lung",
    "LB": "lung",
    "LC": "lung",
    "YA": "lung",
    "YB": "lung",
}


def _philips(k: str) -> str | None:
    return _PHILIPS.get(k)


def _canon(k: str) -> str | None:
    m = re.fullmatch(r"(FC|FL)(\d{2})", k)
    if not m:
        return None
    n = int(m.group(2))
    if m.group(1) == "FL":
        return "lung"
    if n < 10:
        return "soft"
    if n < 30:
        return "standard"
    if n < 50:
        return "bone"
    return "lung" if n < 60 else "sharp"


def _united(k: str) -> str | None:
    parts = k.split("_")
    if len(parts) < 2 or parts[0] not in ("B", "H", "L", "C", "E"):
        return None
    if parts[0] == "L":
        return "lung"
    return {
        "SOFT": "soft",
        "STD": "standard",
        "STANDARD": "standard",
        "MEDIUM": "standard",
        "SHARP": "sharp",
        "BONE": "bone",
        "LUNG": "lung",
    }.get(parts[1])


def _words(k: str) -> str | None:
    for pattern, cls in (
        (r"LUNG", "lung"),
        (r"BONE", "bone"),
        (r"SHARP|DETAIL|EDGE", "sharp"),
        (r"SOFT", "soft"),
        (r"STANDARD|\bSTD\b", "standard"),
    ):
        if re.search(pattern, k):
            return cls
    return None


_VENDORS: dict[str, Callable[[str], str | None]] = {
    "GE": _ge,
    "United Imaging": _united,
    "Canon": _canon,
    "Siemens": _siemens,
    "Philips": _philips,
}
_MANUFACTURERS = (
    (r"SIEMENS", "Siemens"),
    (r"\bGE\b|GENERAL ELECTRIC", "GE"),
    (r"PHILIPS", "Philips"),
    (r"TOSHIBA|CANON", "Canon"),
    (r"UNITED IMAGING|\bUIH\b", "United Imaging"),
)


def vendor_of(manufacturer: str) -> str:
    """The vendor a Manufacturer value names ("" when none of the five)."""
    m = str(manufacturer or "").upper()
    return next((v for pattern, v in _MANUFACTURERS if re.search(pattern, m)), "")


def classify(kernel: str, manufacturer: str = "") -> Kernel:
    """The class of ``kernel`` (ConvolutionKernel, first value when multi-valued)."""
    name = str(kernel or "").split("\\")[0].strip()
    key = re.sub(r"\s+", " ", name.upper())
    vendor = vendor_of(manufacturer)
    if not key:
        return Kernel(name, vendor, UNKNOWN)
    if vendor:
        cls = _VENDORS[vendor](key) or _words(key)
        return Kernel(name, vendor, cls or UNKNOWN)
    for v, rule in _VENDORS.items():
        cls = rule(key)
        if cls:
            return Kernel(name, v, cls)
    return Kernel(name, "", _words(key) or UNKNOWN)


def rank(kernel_class: str, preferred: tuple[str, ...] | list[str]) -> int:
    """Sort key of a class: its place in ``preferred``; then ``unknown`` (it may be soft);
    then every other known class."""
    if kernel_class in preferred:
        return list(preferred).index(kernel_class)
    return len(preferred) + (0 if kernel_class == UNKNOWN else 1)
