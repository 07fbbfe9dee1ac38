"""The Grad-CAM review page: what it embeds (unit) and what it draws (headless Chromium)."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources

import numpy as np
import pytest

from radflow.viewer import (
    BLOCK_PLACEHOLDERS,
    PLACEHOLDERS,
    ViewerCase,
    order_cases,
    write_viewer,
)

SHAPE = (24, 20, 16)  # X (toward patient's right), Y (anterior), Z (superior)
SPACING = (1.5, 1.2, 2.5)
BLOB = (8, 11, 7)  # CAM peak, left-posterior-inferior part of the volume
MARKER = (21, 17, 13)  # a bright CT cube at the patient's right, anterior, superior
EVIL = 'x</script><script>window.pwned=1</script>"&<b>'

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def make_case(case_id, group="TP", p=0.9, pred=1, label=1, seed=0, blob=BLOB, **kw) -> ViewerCase:
    rng = np.random.default_rng(seed)
    x, y, z = np.indices(SHAPE)
    ct = (30 + 8 * z + rng.integers(0, 10, SHAPE)).astype(np.uint8)  # changes with z, <= 159
    mx, my, mz = MARKER
    ct[mx - 1 : mx + 2, my - 1 : my + 2, mz - 1 : mz + 2] = 255
    d2 = (x - blob[0]) ** 2 + (y - blob[1]) ** 2 + (z - blob[2]) ** 2
    cam = np.round(255 * np.exp(-d2 / 6.0)).astype(np.uint8)
    roi = np.zeros(SHAPE, bool)
    roi[3:18, 4:15, 3:12] = True
    fields = dict(
        case_id=case_id,
        group=group,
        probability=p,
        prediction=pred,
        label=label,
        split="test",
        threshold=0.5,
        numbers={"cam_peak_raw": 3.25, "cam_mass_in_roi": 0.81, "n_voxels": int(roi.sum())},
        ct=ct,
        cam=cam,
        roi=roi,
        spacing=SPACING,
        peak=blob,
    )
    fields.update(kw)
    return ViewerCase(**fields)


def page_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="radflow-data">(.*?)</script>', html, re.S)
    assert m, "no data script"
    return json.loads(m.group(1))


# ---------------------------------------------------------------- unit


def test_page_is_one_offline_file_with_grouped_sorted_cases(tmp_path):
    cases = [
        make_case("tn-a", "TN", p=0.30, pred=0, label=0),
        make_case("tp-lo", "TP", p=0.60),
        make_case("fn-a", "FN", p=0.45, pred=0, label=1),
        make_case("u-1", "unlabelled", p=0.7, label=None),
        make_case("tn-b", "TN", p=0.05, pred=0, label=0),
        make_case("fp-a", "FP", p=0.55, label=0),
        make_case("tp-hi", "TP", p=0.98),
    ]
    out = tmp_path / "review" / "viewer.html"
    write_viewer(cases, out, meta={"model": "resnet10", "auc": np.float64(0.91), "n": 7})

    assert [p.name for p in out.parent.iterdir()] == ["viewer.html"]  # no temp file left
    text = out.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", text), "external resource"
    data = page_data(text)
    assert [c["id"] for c in data["cases"]] == [
        "tp-hi", "tp-lo", "fp-a", "fn-a", "tn-b", "tn-a", "u-1"
    ]  # fmt: skip
    assert [c.case_id for c in order_cases(cases)] == [c["id"] for c in data["cases"]]
    assert data["meta"] == {"model": "resnet10", "auc": 0.91, "n": 7}
    first = data["cases"][0]
    assert first["shape"] == list(SHAPE) and first["peak"] == list(BLOB)
    assert first["numbers"]["cam_mass_in_roi"] == 0.81
    assert data["cases"][-1]["label"] is None


def test_embedded_volumes_round_trip(tmp_path):
    case = make_case("c1")
    out = tmp_path / "v.html"
    write_viewer([case], out)
    text = out.read_text()
    m = re.search(r'<script type="application/octet-stream" id="vol-0">([^<]*)</script>', text)
    raw = np.frombuffer(gzip.decompress(base64.b64decode(m.group(1))), np.uint8)
    ct, cam, roi = raw.reshape(3, *SHAPE)
    assert np.array_equal(ct, case.ct) and np.array_equal(cam, case.cam)
    assert np.array_equal(roi, case.roi.astype(np.uint8))


def test_hostile_case_id_and_numbers_are_escaped(tmp_path):
    case = make_case(EVIL, numbers={"</script>": "<img onerror=x>", "nan": float("nan")})
    out = tmp_path / "v.html"
    write_viewer([case], out, title="<b>review</b>", meta={"note": "</script><!--"})
    text = out.read_text()
    assert "</script><script>" not in text
    assert "<img" not in text and "<b>review" not in text and "<!--" not in text
    assert text.count("</script>") == 3  # data, one volume, the code
    data = page_data(text)
    assert data["cases"][0]["id"] == EVIL
    assert data["cases"][0]["numbers"] == {"</script>": "<img onerror=x>", "nan": "nan"}


def test_bad_input_is_refused(tmp_path):
    out = tmp_path / "v.html"
    with pytest.raises(ValueError, match="group"):
        write_viewer([make_case("a", group="maybe")], out)
    with pytest.raises(ValueError, match="duplicate"):
        write_viewer([make_case("a"), make_case("a")], out)
    with pytest.raises(ValueError, match="one shape"):
        write_viewer([make_case("a", cam=np.zeros((2, 2, 2), np.uint8))], out)
    with pytest.raises(ValueError, match="uint8"):
        write_viewer([make_case("a", ct=np.zeros(SHAPE, np.int16))], out)
    with pytest.raises(ValueError, match="peak"):
        write_viewer([make_case("a", peak=(24, 0, 0))], out)
    assert not out.exists()
    write_viewer([], out)  # an empty cohort still gets a page (it says there are no cases)
    assert page_data(out.read_text())["cases"] == []


def asset(name: str) -> str:
    return resources.files("radflow.viewer").joinpath(name).read_text(encoding="utf-8")


def test_page_template_has_each_placeholder_once():
    page = asset("page.html")
    assert sorted(re.findall(r"\{\{(\w+)\}\}", page)) == sorted(PLACEHOLDERS)
    for name in PLACEHOLDERS:
        assert page.count("{{" + name + "}}") == 1, name
    lines = page.splitlines()
    for name in BLOCK_PLACEHOLDERS:  # replaced with its whole line
        assert "{{" + name + "}}" in lines, f"{{{{{name}}}}} must stand alone on its line"
    assert "<!--" not in page  # would reach every page (and the escaping test rejects it)


def test_styles_and_script_can_be_inlined():
    css, js = asset("review.css"), asset("review.js")
    assert "</style" not in css.lower() and "</script" not in js.lower() and "<!--" not in js
    depth = 0
    for ch in re.sub(r"/\*.*?\*/", "", css, flags=re.S):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "unbalanced } in review.css"
    assert depth == 0, "unbalanced { in review.css"


def test_script_parses():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: review.js not syntax-checked")
    with resources.as_file(resources.files("radflow.viewer").joinpath("review.js")) as js:
        run = subprocess.run([node, "--check", str(js)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- browser


def _chromium() -> str | None:
    """Debian's chromium (or RADFLOW_CHROMIUM): playwright drives it, downloads no browser."""
    named = os.environ.get("RADFLOW_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):  # CI installs chromium: a skip there would hide a broken install
        pytest.fail(f"{reason}; CI=true makes this a failure: CI must install it")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        _unavailable(
            "browser test needs chromium: apt-get install -y --no-install-recommends chromium"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("browser test needs the playwright Python package (dev extra)")
    profile = tempfile.mkdtemp(prefix="radflow-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile,
                executable_path=exe,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 900},
            )
            yield ctx
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def viewer(browser, tmp_path):
    """Open a 3-case page; yield (page, errors); assert no console error at the end."""
    cases = [
        make_case("case-b", "FP", p=0.7, label=0, seed=1, blob=(15, 6, 9)),
        make_case("case-a", "TP", p=0.95, seed=0),
        make_case(EVIL, "TN", p=0.2, pred=0, label=0, seed=2, blob=(5, 5, 4)),
    ]
    out = tmp_path / "viewer.html"
    write_viewer(cases, out, meta={"model": "resnet10-test", "auc": 0.875})
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(out.as_uri())
    assert page.evaluate("window.radflowViewer.ready") is True
    yield page, errors
    page.close()
    assert errors == []


PIXELS_JS = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let s = "";
  for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode(...d.subarray(i, i + 8192));
  return [c.width, c.height, btoa(s)];
}"""


def pixels(page, view: str) -> np.ndarray:
    w, h, b64 = page.evaluate(PIXELS_JS, f"canvas-{view}")
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(h, w, 4)[..., :3]


def axial_pixel(img: np.ndarray, x: int, y: int) -> np.ndarray:
    """Canvas pixel at the centre of voxel (x, y) of an axial slice, radiological convention."""
    h, w, _ = img.shape
    col = int((SHAPE[0] - 1 - x + 0.5) * w / SHAPE[0])
    row = int((SHAPE[1] - 1 - y + 0.5) * h / SHAPE[1])
    return img[row, col].astype(int)


def test_browser_slices_overlay_and_aspect(viewer, tmp_path):
    page, _errors = viewer
    assert page.evaluate("window.radflowViewer.currentCase") == "case-a"  # most confident TP
    assert page.locator("#slider-axial").input_value() == str(BLOB[2])  # starts at the peak
    assert page.locator("#slider-coronal").input_value() == str(BLOB[1])
    assert page.locator("#slider-sagittal").input_value() == str(BLOB[0])
    # physical aspect ratio: axial is 24 * 1.5 mm wide, 20 * 1.2 mm high
    h, w, _ = pixels(page, "axial").shape
    assert w / h == pytest.approx(SHAPE[0] * SPACING[0] / (SHAPE[1] * SPACING[1]), rel=0.02)
    assert w >= 300  # scaled up to a useful size

    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
    on = pixels(page, "axial")
    r, g, b = axial_pixel(on, *BLOB[:2])
    assert max(r, g, b) - min(r, g, b) > 40, "CAM blob should be coloured"

    page.locator("#toggle-cam").uncheck()
    off = pixels(page, "axial")
    assert not np.array_equal(on, off)
    r, g, b = axial_pixel(off, *BLOB[:2])
    assert r == g == b, "without the overlay the CT is grey"

    page.locator("#slider-axial").fill(str(BLOB[2] - 4))
    moved = pixels(page, "axial")
    assert not np.array_equal(off, moved)
    assert axial_pixel(moved, *BLOB[:2])[0] < r  # CT is darker further down in z

    page.locator("#slider-axial").fill(str(BLOB[2]))
    page.locator("#toggle-cam").check()
    page.locator("#opacity").fill("100")
    strong = pixels(page, "axial")
    page.locator("#opacity").fill("10")
    assert not np.array_equal(strong, pixels(page, "axial"))


def test_browser_orientation_is_radiological(viewer):
    page, _errors = viewer
    for box in ("#toggle-cam", "#toggle-roi", "#toggle-crosshair"):
        page.locator(box).uncheck()
    page.locator("#slider-axial").fill(str(MARKER[2]))
    page.locator("#slider-coronal").fill(str(MARKER[1]))
    page.locator("#slider-sagittal").fill(str(MARKER[0]))
    # marker at the patient's right (high x), anterior (high y), superior (high z):
    # axial: right -> screen left, anterior -> up; coronal: right -> left, superior -> up;
    # sagittal: anterior -> left, superior -> up.  So top-left in all three views.
    for view, (h_axis, v_axis) in {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}.items():
        img = pixels(page, view)
        rows, cols = np.nonzero(img.min(axis=2) == 255)
        assert rows.size, f"marker not drawn in {view}"
        height, width, _ = img.shape
        assert cols.mean() < width / 2 and rows.mean() < height / 2, view
        expect_col = (SHAPE[h_axis] - 1 - MARKER[h_axis] + 0.5) * width / SHAPE[h_axis]
        expect_row = (SHAPE[v_axis] - 1 - MARKER[v_axis] + 0.5) * height / SHAPE[v_axis]
        assert abs(cols.mean() - expect_col) < width / SHAPE[h_axis], view
        assert abs(rows.mean() - expect_row) < height / SHAPE[v_axis], view


def test_browser_click_sets_other_slices_and_roi_outline(viewer):
    page, _errors = viewer
    page.locator("#toggle-cam").uncheck()
    page.locator("#toggle-crosshair").uncheck()
    with_roi = pixels(page, "axial")
    page.locator("#toggle-roi").uncheck()
    assert not np.array_equal(with_roi, pixels(page, "axial"))

    box = page.locator("#canvas-axial").bounding_box()
    x, y = 4, 15  # click the centre of voxel (x=4, y=15) in the axial view
    page.mouse.click(
        box["x"] + (SHAPE[0] - 1 - x + 0.5) * box["width"] / SHAPE[0],
        box["y"] + (SHAPE[1] - 1 - y + 0.5) * box["height"] / SHAPE[1],
    )
    assert page.locator("#slider-sagittal").input_value() == str(x)
    assert page.locator("#slider-coronal").input_value() == str(y)
    assert page.locator("#slider-axial").input_value() == str(BLOB[2])

    page.mouse.wheel(0, 120)  # the wheel over the axial view steps its slice
    page.wait_for_function(f"document.getElementById('slider-axial').value === '{BLOB[2] - 1}'")
    page.keyboard.press("c")  # keyboard toggles
    assert page.locator("#toggle-cam").is_checked()


def test_browser_case_switch_keys_and_hostile_id(viewer):
    page, _errors = viewer
    assert page.evaluate("window.pwned") is None
    groups = page.locator(".group-head").all_inner_texts()
    assert [g.split("\n")[-1] for g in groups] == ["1", "1", "1"]
    ids = page.evaluate("[...document.querySelectorAll('.case-item')].map(e => e.dataset.case)")
    assert ids == ["case-a", "case-b", EVIL]  # TP, FP, TN
    before = {v: pixels(page, v) for v in ("axial", "coronal", "sagittal")}

    page.locator(".case-item").nth(1).click()
    page.wait_for_function("window.radflowViewer.currentCase === 'case-b'")
    assert page.locator("#slider-axial").input_value() == "9"  # case-b's peak z
    for view, img in before.items():
        assert not np.array_equal(img, pixels(page, view)), view
    assert "case-b" in page.locator("#case-title").inner_text()
    assert "0.875" in page.locator("#meta").inner_text()
    numbers = page.locator("#numbers").inner_text()
    for text in ("cam_mass_in_roi", "0.81", "cam_peak_raw", "3.25", "0.7", "test", "FP"):
        assert text in numbers

    page.keyboard.press("j")
    page.wait_for_function("window.radflowViewer.currentCase !== 'case-b'")
    assert page.evaluate("window.radflowViewer.currentCase") == EVIL
    assert page.locator("#case-title").inner_text() == EVIL
    page.keyboard.press("ArrowUp")
    page.wait_for_function("window.radflowViewer.currentCase === 'case-b'")
    assert page.locator(".case-item.selected").get_attribute("data-case") == "case-b"
