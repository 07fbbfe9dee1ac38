"""Per-case status records: how one bad case fails alone.

Every per-case stage (convert, segment, mask) ends by writing a JSON record for the case, also
when the case cannot be used: ``{"status": "failed", "stage": ..., "reason_code": ...,
"reason": ...}``. The record is the job's declared output, so Snakemake sees the job done and
the rest of the cohort goes on; the next stage carries a failed record over instead of working
on the case, and the manifest lists the case in ``excluded.csv`` with the stage and the reason.
A failure's text never holds a raw path or identifier (callers pass redacted messages).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

OK = "ok"
FAILED = "failed"


class CaseFailedError(Exception):
    """A case that cannot go on, with a machine-readable code and a sentence."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"[{code}] {reason}")
        self.code = code
        self.reason = reason


def failure(stage: str, exc: BaseException | None = None, code: str = "", reason: str = "") -> dict:
    """A failed record for ``stage`` from an exception (or an explicit code and reason)."""
    if exc is not None:
        code = getattr(exc, "code", "") or code or type(exc).__name__.upper()
        reason = getattr(exc, "reason", "") or reason or f"{type(exc).__name__}: {exc}"
    return {"status": FAILED, "stage": stage, "reason_code": code, "reason": reason}


def read(path: str | os.PathLike) -> dict[str, Any]:
    """A record (a convert sidecar, a label map's JSON, a mask status)."""
    return json.loads(Path(path).read_text())


def is_ok(record: dict[str, Any]) -> bool:
    """True unless the record says the case failed (records from before this field are ok)."""
    return record.get("status", OK) == OK


def read_upstream(path: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The failed record behind ``path`` (a JSON record of ``stage``), or None when the case
    is fine there or ``path`` is a volume rather than a record."""
    p = Path(path)
    if p.suffix != ".json":
        return None
    rec = read(p)
    if is_ok(rec):
        return None
    return {k: rec.get(k, "") for k in ("status", "stage", "reason_code", "reason")} | {
        "stage": rec.get("stage") or stage
    }


def remove_stale(*files: str | os.PathLike) -> None:
    """Remove outputs a failed case must not keep from an earlier, successful run."""
    for f in files:
        Path(f).unlink(missing_ok=True)


_ENVIRONMENT_ERRNOS = {"ENOSPC", "EDQUOT", "ENOMEM", "EIO", "EROFS", "EMFILE", "ENFILE"}


def is_environmental(exc: BaseException) -> bool:
    """True for the machine's trouble (no memory, a full or read-only disk, I/O errors), which
    must fail the job so that a rerun retries it; False for a problem of the case's data (a
    corrupt or truncated file, a refused series), which is recorded and fails the case alone."""
    import errno

    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, "") in _ENVIRONMENT_ERRNOS
    return False
