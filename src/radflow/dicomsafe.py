"""Reading DICOM headers of untrusted files without letting a file decide how much memory we use.

pydicom inflates a whole deflated file (1.2.840.10008.1.2.1.99) in memory even with
``stop_before_pixels``, and decodes encapsulated pixel data (RLE, JPEG...) into an array of the
size the header claims. A 2 MB deflated file can claim 2 GiB, a 1 kB RLE file 512 MiB per frame.
``read_header`` reads the file meta itself, inflates deflated data set bytes incrementally only up
to the PixelData element (and at most ``HEADER_CAP`` bytes), then streams over the rest counting,
never keeping it; ``claim_error`` compares what the header claims with the budget
(``ingest.max_image_mb``) before anything is allocated or decoded. No pandas here: convert uses
this module too.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import Tag

# The schema (workflow/schemas/config.schema.yaml, ingest.max_image_mb) is the source of truth;
# a test checks that this default is the same.
DEFAULT_MAX_IMAGE_MB = 2048
DEFLATED = "1.2.840.10008.1.2.1.99"
# Header bytes inflated at most while looking for PixelData (a real CT header is a few kB).
HEADER_CAP = 16 << 20
# pydicom reads header values larger than this only when accessed (a hostile 1 GB private tag).
DEFER_SIZE = 1 << 20
PIXEL_DATA = Tag(0x7FE0, 0x0010)
_PIXEL_TAGS = {Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009), PIXEL_DATA}
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
MB = 1 << 20


class HeaderError(ValueError):
    """The header cannot be read safely; the message is the reason (never a path)."""


@dataclass
class Header:
    """A data set without pixels, and what is known about its pixel data."""

    ds: pydicom.Dataset
    transfer_syntax: str
    pixel_offset: int | None  # file offset of the PixelData element (None: deflated)
    has_pixels: bool
    pixel_bytes_available: int | None = None  # deflated: inflated bytes after the element header


def _int(ds: pydicom.Dataset, key: str, default: int) -> int:
    try:
        v = ds.get(key)
        return int(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames (1 when absent or unreadable)."""
    return max(1, _int(ds, "NumberOfFrames", 1))


def pixel_claim_bytes(ds: pydicom.Dataset) -> int:
    """Bytes of decoded pixel data the header claims (rows x cols x frames x samples x bytes)."""
    bits = _int(ds, "BitsAllocated", 16)
    return (
        max(0, _int(ds, "Rows", 0))
        * max(0, _int(ds, "Columns", 0))
        * frames(ds)
        * max(1, _int(ds, "SamplesPerPixel", 1))
        * max(1, (bits + 7) // 8)
    )


def int16_claim_bytes(ds: pydicom.Dataset) -> int:
    """Bytes of the int16 volume the header's frames make (what convert allocates)."""
    return max(0, _int(ds, "Rows", 0)) * max(0, _int(ds, "Columns", 0)) * frames(ds) * 2


def too_large(claim_bytes: int, max_image_mb: float, what: str = "pixel data") -> str:
    """The reason a claim is over budget, or ""."""
    if claim_bytes > max_image_mb * MB:
        return f"claims {claim_bytes / MB:.0f} MB of {what} > ingest.max_image_mb {max_image_mb:g}"
    return ""


def claim_error(ds: pydicom.Dataset, max_image_mb: float) -> str:
    """Why one file's pixel data is over budget (decoded, and as int16), or ""."""
    return too_large(max(pixel_claim_bytes(ds), int16_claim_bytes(ds)), max_image_mb)


def read_header(path: str | os.PathLike, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> Header:
    """The header of ``path`` (pixels not read, at most ``HEADER_CAP`` bytes inflated).

    Raises ``pydicom.errors.InvalidDicomError`` for a file that is not DICOM, ``HeaderError``
    when a deflated file is corrupt or over budget, and what ``open`` raises.
    """
    with open(path, "rb") as fp:
        read_preamble(fp, False)  # InvalidDicomError without the DICM prefix
        meta = _read_file_meta_info(fp)
        ts = str(meta.get("TransferSyntaxUID", ""))
        if ts == DEFLATED:
            return _read_deflated(fp, meta, max_image_mb)
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=DEFER_SIZE)
        offset = fp.tell()
        fp.seek(0, os.SEEK_END)
        size = fp.tell()
    return Header(ds, ts, offset, has_pixels=_int(ds, "Rows", 0) > 0 and offset < size)


class _Inflater:
    """A read/seek/tell file over a raw deflate stream, inflating only what is read."""

    def __init__(self, fp: Any, cap: int) -> None:
        self._fp = fp
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = 0
        self._cap = cap
        self._pending = b""
        self.ended = False  # the deflate stream's last block was reached
        self.cut = False  # the file ended before the stream did

    def _more(self, max_out: int) -> bytes:
        if self.ended or self.cut:
            return b""
        if not self._pending:
            self._pending = self._fp.read(1 << 16)
            if not self._pending:
                self.cut = True
                return b""
        try:
            out = self._z.decompress(self._pending, max_out)
        except zlib.error as exc:
            raise HeaderError(f"corrupt deflate stream ({exc})") from None
        self._pending = self._z.unconsumed_tail
        self.ended = self._z.eof
        return out

    def _fill(self, upto: int) -> None:
        while len(self._buf) < upto and not (self.ended or self.cut):
            if len(self._buf) >= self._cap:
                raise HeaderError(
                    f"deflated header larger than {self._cap // MB} MB without pixel data"
                )
            self._buf += self._more(min(1 << 20, self._cap - len(self._buf)))

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._cap - self._pos
        self._fill(self._pos + n)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos}.get(whence)
        if base is None:
            raise OSError("seek from the end of a deflate stream")
        self._pos = max(0, base + offset)
        return self._pos

    def count_rest(self, limit: int) -> int:
        """Inflated bytes from the current position to the end of the stream, counting (never
        keeping) them, stopping once more than ``limit``."""
        total = max(0, len(self._buf) - self._pos)
        while not (self.ended or self.cut) and total <= limit:
            total += len(self._more(1 << 20))
        return total


def _read_deflated(fp: Any, meta: pydicom.Dataset, max_image_mb: float) -> Header:
    src = _Inflater(fp, HEADER_CAP)

    def at_pixels(tag: Any, vr: Any, length: int) -> bool:
        return tag in _PIXEL_TAGS

    ds = read_dataset(src, is_implicit_VR=False, is_little_endian=True, stop_when=at_pixels)
    ds = pydicom.dataset.FileDataset(
        getattr(fp, "name", ""), ds, file_meta=meta, is_implicit_VR=False, is_little_endian=True
    )
    head = src.read(8)
    has = (
        len(head) == 8
        and Tag(int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little"))
        in _PIXEL_TAGS
    )
    available = None
    if has:
        if head[4:6] in _LONG_VR:
            src.read(4)
        over = claim_error(ds, max_image_mb)
        if over:  # never inflate what is over budget
            return Header(ds, DEFLATED, None, True, None)
        budget = int(max_image_mb * MB)
        available = src.count_rest(budget)
        if available > budget:
            raise HeaderError(
                f"deflated pixel data inflates to more than ingest.max_image_mb {max_image_mb:g}"
            )
        if src.cut:
            raise HeaderError("truncated: deflate stream ends before its last block")
    return Header(ds, DEFLATED, None, has, available)


DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
NON_IMAGE_KINDS = ("DICOMDIR_INDEX", "NON_IMAGE_OBJECT")  # what ``non_image_reason`` starts with


def sop_class_uid(ds: pydicom.Dataset) -> str:
    """SOPClassUID, or the file meta's MediaStorageSOPClassUID where an anonymiser blanked it."""
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = str(meta.get("MediaStorageSOPClassUID", "") or "").strip() if meta else ""
    return uid


def non_image_reason(ds: pydicom.Dataset, has_pixels: bool) -> str:
    """Why a readable DICOM file is not an image instance ("" when it is one).

    A DICOMDIR (a media index) is ``DICOMDIR_INDEX``; an object with neither a pixel matrix
    (Rows) nor pixel data (structured reports, key object selections, presentation states, RT
    structure sets and plans, raw data, encapsulated documents...) is ``NON_IMAGE_OBJECT``,
    named by its SOP class. A file with Rows but no pixel data is an image that was cut short,
    which is the caller's "truncated", not this.
    """
    uid = sop_class_uid(ds)
    if uid == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        n = len(ds.get("DirectoryRecordSequence", None) or [])
        return f"DICOMDIR_INDEX: a DICOMDIR media index ({n} directory records), not an image"
    if has_pixels or _int(ds, "Rows", 0) > 0:
        return ""
    # header values only in forms that cannot carry free text (a UID's digits, a CS code)
    name = pydicom.uid.UID(uid).name if re.fullmatch(r"[0-9.]{1,64}", uid) else "no SOP class"
    modality = str(ds.get("Modality", "") or "").strip()
    modality = modality if re.fullmatch(r"[A-Z0-9_]{1,16}", modality) else "?"
    return f"NON_IMAGE_OBJECT: {name} (modality {modality}), no pixel data"


_QUOTED_PATH = re.compile(r"""(['"])[^'"]*[/\\][^'"]*\1""")


def scrub(message: str, *paths: str | os.PathLike) -> str:
    """``message`` without any of ``paths`` (whole, relative or file name) or quoted paths."""
    out = str(message)
    for p in paths:
        s = os.fspath(p)
        for text in (s, os.path.abspath(s), os.path.basename(s)):
            if len(text) >= 3:
                out = out.replace(text, "<file>")
    out = _QUOTED_PATH.sub("'<path>'", out)
    return out[:300]


def error_text(exc: BaseException, *paths: str | os.PathLike) -> str:
    """``Type: message`` of an exception, scrubbed of paths (OSError: its strerror only)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {scrub(str(exc), *paths)}"
