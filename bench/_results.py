"""Dated result files for the benchmarks.

Each ``bench/*.py`` keeps printing its figures and, with ``--results DIR`` (default
``bench/results``; ``--results ''`` writes nothing), also writes them to
``DIR/<YYYY-MM-DD>-<name>.json``: the command, the commit, the machine, the arguments, every
line printed and, where the last line printed is JSON (dag_scale), that object as ``results``.
A second run of the same bench on the same day gets ``-2``, ``-3``, ... so that no earlier
measurement is overwritten. Set ``RADFLOW_BENCH_MACHINE`` to describe the machine in words
(``2-core CI VM``); otherwise its CPU count and platform are recorded. Under pytest
(``PYTEST_CURRENT_TEST`` set, as tests/test_bench.py's smoke runs inherit it) the default folder
is left alone: a smoke run is not a measurement; an explicit ``--results DIR`` still writes.

Usage in a bench script::

    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("convert_speed", args)
    ...                                   # print as before
    _results.finish()                     # only after a successful run
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT = BENCH / "results"

_state: dict = {}


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, s: str) -> int:
        self.copy.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def add_argument(ap: argparse.ArgumentParser) -> None:
    """The ``--results DIR`` option shared by every bench script."""
    ap.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="also write what is printed to DIR/<YYYY-MM-DD>-<bench>.json "
        "(default bench/results; '' writes nothing)",
    )


def start(name: str, args: argparse.Namespace) -> None:
    """Begin keeping a copy of stdout for ``finish``."""
    if args.results is None:
        args.results = "" if os.environ.get("PYTEST_CURRENT_TEST") else str(DEFAULT)
    if not args.results:
        return
    tee = _Tee(sys.stdout)
    _state.update(name=name, args=args, tee=tee, stdout=sys.stdout)
    sys.stdout = tee


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _machine() -> str:
    described = os.environ.get("RADFLOW_BENCH_MACHINE")
    if described:
        return described
    return f"{os.cpu_count()}-core {platform.machine()} {platform.system()}"


def finish() -> Path | None:
    """Write the dated result file (the path is reported on stderr, stdout stays as printed)."""
    if not _state:
        return None
    sys.stdout = _state["stdout"]
    name, args = _state["name"], _state["args"]
    lines = _state["tee"].copy.getvalue().splitlines()
    _state.clear()
    today = datetime.date.today().isoformat()
    record = {
        "bench": name,
        "date": today,
        "command": shlex.join(["python", f"bench/{name}.py", *sys.argv[1:]]),
        "commit": _commit(),
        "machine": _machine(),
        "python": platform.python_version(),
        "arguments": {k: v for k, v in vars(args).items() if k != "results"},
        "output": lines,
    }
    if lines:
        try:
            record["results"] = json.loads(lines[-1])
        except ValueError:
            pass
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{today}-{name}.json"
    n = 2
    while path.exists():
        path = folder / f"{today}-{name}-{n}.json"
        n += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.rename(path)
    print(f"results written to {path}", file=sys.stderr)
    return path
