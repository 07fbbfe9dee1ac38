"""A killed run's stale Snakemake lock, released by the next run when it is provably stale.

Snakemake locks the working directory while it runs and refuses a second run on it ("Directory
cannot be locked"). A run that is killed (kill -9, a lost session, a node that went down) cannot
release its lock, and the next run then stops until someone types ``snakemake --unlock``. Every
radflow run records who holds the lock (``.snakemake/radflow-run.json``: host, pid and the
process's start time). The next run on the same host releases the lock only when that process is
gone (or its pid now belongs to another process): a run still going keeps its lock, and a lock
taken on another host (a cluster's shared filesystem) or by a run that recorded nothing is left
to ``snakemake --unlock``, as before.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

RECORD = "radflow-run.json"


def _me() -> dict[str, object]:
    import psutil

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": psutil.Process(pid).create_time()}


def _alive(rec: dict[str, object]) -> bool:
    import psutil

    try:
        return abs(psutil.Process(int(rec["pid"])).create_time() - float(rec["start"])) < 1e-3
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def take_over(snakemake_dir: str | os.PathLike = ".snakemake") -> bool:
    """Called by the main Snakemake process of a real (not dry) run before it locks: release a
    stale lock left by a killed radflow run on this host, and record this run. Returns whether
    a lock was released."""
    folder = Path(snakemake_dir)
    locks = folder / "locks"
    record = folder / RECORD
    held = locks.is_dir() and any(locks.glob("*.lock"))
    released = False
    if held:
        try:
            rec = json.loads(record.read_text())
        except (OSError, ValueError):
            return False  # a lock nobody recorded: Snakemake reports it, --unlock releases it
        if rec.get("host") != socket.gethostname() or _alive(rec):
            return False  # another host's run, or a run still going: its lock stands
        for f in locks.glob("*.lock"):
            f.unlink(missing_ok=True)
        released = True
        print(
            f"radflow: released the lock of a killed run (pid {rec.get('pid')} has ended); "
            "a plain rerun recovers it",
            file=sys.stderr,
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{RECORD}.{os.getpid()}")
    tmp.write_text(json.dumps(_me()))
    os.replace(tmp, record)
    return released
