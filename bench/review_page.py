"""How fast the Grad-CAM review page opens: a page of N synthetic cases in headless Chromium.

Writes a page of ``--cases`` synthetic cases (CT ``--size``³ voxels, CAM, ROI, lesion) with
``radflow.viewer.write_viewer``, opens it from its ``file://`` URL in headless Chromium (WebGL
through SwiftShader, no GPU) ``--repeats`` times in a fresh tab, and prints per open:

* ``dom``: navigation to DOMContentLoaded (the page and its case list usable),
* ``first``: navigation to the first case drawn by NiiVue (its data script loaded and decoded),
* ``switch``: clicking another case until it is drawn (its data script loaded on demand),
* from the page's own clock (``radflowViewer.timings``): when NiiVue was parsed, when the case
  list was drawn, when NiiVue's WebGL context was ready and when the first case was drawn,

then the median of each and the size of the page, NiiVue and one case's data script. The
target of issue 19 is a page of 100 cases open (``first``) in under 2 s.

    python bench/review_page.py --cases 100 --size 96
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import _results


def synthetic_cases(n: int, size: int) -> list:
    from radflow.viewer import GROUPS, ViewerCase

    rng = np.random.default_rng(0)
    x, y, z = np.indices((size, size, size))
    c = size / 2
    body = (x - c) ** 2 + (y - c) ** 2 < (0.45 * size) ** 2
    organ = (x - 0.6 * size) ** 2 + (y - 0.55 * size) ** 2 + (z - c) ** 2 < (0.25 * size) ** 2
    cases = []
    for i in range(n):
        ct = np.where(body, 40, -1000) + np.where(organ, 20, 0) + rng.normal(0, 12, body.shape)
        p = rng.uniform(0.6, 0.75, 3) * size
        lesion = ((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) < (0.06 * size) ** 2
        ct[lesion] -= 30
        d2 = (x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2
        cam = np.exp(-d2 / (2 * (0.1 * size) ** 2)).astype(np.float32)
        label, pred = int(i % 2), int((i // 2) % 2)
        group = {(1, 1): "TP", (0, 1): "FP", (1, 0): "FN", (0, 0): "TN"}[(label, pred)]
        assert group in GROUPS
        cases.append(
            ViewerCase(
                case_id=f"case-{i:012x}",
                group=group,
                probability=float(rng.uniform(0.55, 0.95) if pred else rng.uniform(0.05, 0.45)),
                prediction=pred,
                label=label,
                split="test",
                threshold=0.5,
                numbers={"CAM mass in ROI": 0.8},
                ct=np.rint(ct).astype(np.int16),
                cam=cam,
                roi=organ,
                affine=np.diag([1.5, 1.5, 2.0, 1.0]),
                window=(-160.0, 240.0),
                peak=tuple(int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape)),
                lesion=lesion,
            )
        )
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--size", type=int, default=96, help="CT voxels along each axis")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chromium", default=os.environ.get("RADFLOW_CHROMIUM") or "chromium")
    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("review_page", args)
    from playwright.sync_api import sync_playwright

    from radflow.viewer import NIIVUE_JS, case_file, write_viewer

    work = Path(tempfile.mkdtemp(prefix="radflow-review-bench-"))
    try:
        t0 = time.perf_counter()
        out = work / "index.html"
        write_viewer(synthetic_cases(args.cases, args.size), out)
        print(f"wrote a page of {args.cases} cases ({args.size}^3 CT) in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        kb = {
            "page": out.stat().st_size / 1024,
            "niivue": (work / NIIVUE_JS).stat().st_size / 1024,
            "one case": (work / case_file(0)).stat().st_size / 1024,
        }
        print("sizes KiB: " + ", ".join(f"{k} {v:.0f}" for k, v in kb.items()))
        exe = shutil.which(args.chromium) or args.chromium
        rows = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
            for k in range(args.repeats):
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                t = time.perf_counter()
                page.goto(out.as_uri(), wait_until="domcontentloaded")
                dom = time.perf_counter() - t
                if page.evaluate("window.radflowViewer.ready") is not True:
                    raise SystemExit("the page did not draw its first case: " + str(errors))
                first = time.perf_counter() - t
                ms = page.evaluate("window.radflowViewer.timings")
                target = f"case-{(k + 7) % args.cases:012x}"
                t = time.perf_counter()
                page.locator(f".case-item[data-case='{target}']").click()
                page.wait_for_function(f"window.radflowViewer.currentCase === '{target}'")
                switch = time.perf_counter() - t
                page.close()
                rows.append((dom, first, switch))
                print(f"open {k + 1}: dom {dom:.2f} s, first case drawn {first:.2f} s, "
                      f"switch case {switch:.2f} s; in the page: NiiVue parsed "
                      f"{ms['script'] / 1000:.2f} s, case list {ms['list'] / 1000:.2f} s, "
                      f"WebGL ready {ms['webgl'] / 1000:.2f} s, "
                      f"first case {ms['first'] / 1000:.2f} s")  # fmt: skip
            browser.close()
        med = [statistics.median(r[j] for r in rows) for j in range(3)]
        print(f"median over {len(rows)} opens: dom {med[0]:.2f} s, first case drawn "
              f"{med[1]:.2f} s, switch case {med[2]:.2f} s; target: first < 2 s "
              f"({'met' if med[1] < 2.0 else 'NOT met'})")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _results.finish()


# Real WebGL2 without a GPU: Chromium's SwiftShader through ANGLE (as tests/test_viewer.py).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--use-gl=angle",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
]

if __name__ == "__main__":
    main()
