"""The Grad-CAM review page: what it writes (unit) and what NiiVue draws (headless Chromium)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radflow.viewer import (
    BLOCK_PLACEHOLDERS,
    NIIVUE_JS,
    NIIVUE_VERSION,
    PLACEHOLDERS,
    ViewerCase,
    case_file,
    order_cases,
    write_viewer,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (40, 36, 30)  # X (toward patient's right), Y (anterior), Z (superior)
AFFINE = np.array([[1.5, 0, 0, -30], [0, 1.2, 0, -20], [0, 0, 2.5, 10], [0, 0, 0, 1.0]])
BLOB = (12, 20, 15)  # CAM peak
EVIL = 'x</script><script>window.pwned=1</script>"&<b>'

# Real WebGL2 without a GPU: Chromium's SwiftShader through ANGLE.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--use-gl=angle",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def make_case(case_id, group="TP", p=0.9, pred=1, label=1, seed=0, blob=BLOB, **kw) -> ViewerCase:
    rng = np.random.default_rng(seed)
    x, y, z = np.indices(SHAPE)
    ct = (-100 + 8 * z + rng.integers(0, 30, SHAPE)).astype(np.int16)
    d2 = (x - blob[0]) ** 2 + (y - blob[1]) ** 2 + (z - blob[2]) ** 2
    roi = np.zeros(SHAPE, bool)
    roi[5:30, 6:30, 5:25] = True
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
        cam=np.exp(-d2 / 20.0).astype(np.float32),
        roi=roi,
        affine=AFFINE,
        window=(-160.0, 240.0),
        peak=blob,
        lesion=d2 < 9,
    )
    fields.update(kw)
    return ViewerCase(**fields)


def page_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="radflow-data">(.*?)</script>', html, re.S)
    assert m, "no data script"
    return json.loads(m.group(1))


def case_volumes(folder: Path, index: int) -> dict:
    """The volumes of one case's data script as nibabel images (and its id)."""
    text = (folder / case_file(index)).read_text(encoding="ascii")
    m = re.fullmatch(rf"radflowCase\({index},(\{{.*\}})\);\n", text, re.S)
    assert m, "data script is not one radflowCase(index, {...}) call"
    payload = json.loads(m.group(1))
    out = {"id": payload.pop("id")}
    for k, b64 in payload.items():
        raw = gzip.decompress(base64.b64decode(b64)) if b64 else None
        out[k] = nib.Nifti1Image.from_bytes(raw) if raw else None
    return out


# ---------------------------------------------------------------- unit


def test_page_scripts_and_data_are_offline_files_beside_it(tmp_path):
    cases = [
        make_case("tn-a", "TN", p=0.30, pred=0, label=0),
        make_case("tp-lo", "TP", p=0.60),
        make_case("fn-a", "FN", p=0.45, pred=0, label=1),
        make_case("u-1", "unlabelled", p=0.7, label=None, lesion=None),
        make_case("tn-b", "TN", p=0.05, pred=0, label=0),
        make_case("fp-a", "FP", p=0.55, label=0),
        make_case("tp-hi", "TP", p=0.98),
    ]
    out = tmp_path / "review" / "index.html"
    write_viewer(cases, out, meta={"model": "resnet10", "auc": np.float64(0.91), "n": 7})

    files = sorted(str(p.relative_to(out.parent)) for p in out.parent.rglob("*") if p.is_file())
    assert files == sorted(["index.html", NIIVUE_JS] + [case_file(i) for i in range(7)])
    text = out.read_text(encoding="utf-8")
    for f in ["index.html"] + [case_file(i) for i in range(7)]:
        body = (out.parent / f).read_text()
        assert "http://" not in body and "https://" not in body, f
    # the only external reference is NiiVue beside the page; no module scripts, no CDN
    assert re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text) == ["data:,", NIIVUE_JS]
    assert 'type="module"' not in text
    data = page_data(text)
    assert [c["id"] for c in data["cases"]] == [
        "tp-hi", "tp-lo", "fp-a", "fn-a", "tn-b", "tn-a", "u-1"
    ]  # fmt: skip
    assert [c.case_id for c in order_cases(cases)] == [c["id"] for c in data["cases"]]
    assert data["meta"] == {"model": "resnet10", "auc": 0.91, "n": 7}
    first = data["cases"][0]
    assert first["shape"] == list(SHAPE) and first["peak"] == list(BLOB)
    assert first["spacing"] == [1.5, 1.2, 2.5] and first["window"] == [-160.0, 240.0]
    assert first["file"] == case_file(0) and first["lesion"] is True
    assert data["cases"][-1]["label"] is None and data["cases"][-1]["lesion"] is False
    assert (out.parent / NIIVUE_JS).read_bytes() == vendored_niivue().read_bytes()


def test_case_volumes_round_trip_on_the_ct_grid_with_a_bare_header(tmp_path):
    case = make_case("c1")
    out = tmp_path / "index.html"
    write_viewer([case], out)
    v = case_volumes(tmp_path, 0)
    assert v["id"] == "c1"
    for k in ("ct", "cam", "roi", "lesion"):
        img = v[k]
        assert img.shape == SHAPE and np.allclose(img.affine, AFFINE), k
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert bytes(img.header["descrip"]).strip(b"\0") == b"", k  # nothing but geometry
    assert v["ct"].get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(v["ct"].dataobj), case.ct)
    assert np.abs(v["cam"].get_fdata() - case.cam).max() <= 0.5 / 255 + 1e-6
    assert v["roi"].header.get_intent()[0] == "label"  # NiiVue draws label maps as outlines
    assert np.array_equal(np.asanyarray(v["roi"].dataobj), case.roi.astype(np.uint8))
    assert np.array_equal(np.asanyarray(v["lesion"].dataobj), case.lesion.astype(np.uint8))

    write_viewer([make_case("c1", lesion=None)], out)
    assert case_volumes(tmp_path, 0)["lesion"] is None


def test_rewrite_removes_data_scripts_of_the_earlier_page(tmp_path):
    out = tmp_path / "index.html"
    write_viewer([make_case("a"), make_case("b", seed=1), make_case("c", seed=2)], out)
    (tmp_path / "review" / "notes.txt").write_text("kept")
    write_viewer([make_case("a")], out)
    assert sorted(p.name for p in (tmp_path / "review").iterdir()) == ["case-0000.js", "notes.txt"]


def test_hostile_case_id_and_numbers_are_escaped(tmp_path):
    case = make_case(EVIL, numbers={"</script>": "<img onerror=x>", "nan": float("nan")})
    out = tmp_path / "v.html"
    write_viewer([case], out, title="<b>review</b>", meta={"note": "</script><!--"})
    text = out.read_text()
    assert "</script><script>" not in text
    assert "<img" not in text and "<b>review" not in text and "<!--" not in text
    assert text.count("</script>") == 3  # data, NiiVue, the code
    data = page_data(text)
    assert data["cases"][0]["id"] == EVIL
    assert data["cases"][0]["numbers"] == {"</script>": "<img onerror=x>", "nan": "nan"}
    script = (tmp_path / case_file(0)).read_text()
    assert "<" not in script and case_volumes(tmp_path, 0)["id"] == EVIL


def test_bad_input_is_refused(tmp_path):
    out = tmp_path / "v.html"
    with pytest.raises(ValueError, match="group"):
        write_viewer([make_case("a", group="maybe")], out)
    with pytest.raises(ValueError, match="duplicate"):
        write_viewer([make_case("a"), make_case("a")], out)
    with pytest.raises(ValueError, match="one shape"):
        write_viewer([make_case("a", cam=np.zeros((2, 2, 2), np.float32))], out)
    with pytest.raises(ValueError, match="one shape"):
        write_viewer([make_case("a", lesion=np.zeros((2, 2, 2), bool))], out)
    with pytest.raises(ValueError, match="integer HU"):
        write_viewer([make_case("a", ct=np.zeros(SHAPE, np.float32))], out)
    with pytest.raises(ValueError, match="affine"):
        write_viewer([make_case("a", affine=np.zeros((4, 4)))], out)
    with pytest.raises(ValueError, match="window"):
        write_viewer([make_case("a", window=(100.0, -100.0))], out)
    with pytest.raises(ValueError, match="peak"):
        write_viewer([make_case("a", peak=(40, 0, 0))], out)
    assert not out.exists() and not (tmp_path / "review").exists()
    write_viewer([], out)  # an empty cohort still gets a page (it says there are no cases)
    assert page_data(out.read_text())["cases"] == []


def asset(name: str) -> str:
    return resources.files("radflow.viewer").joinpath(name).read_text(encoding="utf-8")


def vendored_niivue() -> Path:
    return Path(str(resources.files("radflow.viewer").joinpath(NIIVUE_JS)))


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


def test_vendored_niivue_is_the_pinned_build():
    """web/package.json and its lock pin NiiVue; the vendored UMD file is that version."""
    pkg = json.loads((ROOT / "web/package.json").read_text())
    lock = json.loads((ROOT / "web/package-lock.json").read_text())
    assert pkg["dependencies"]["@niivue/niivue"] == NIIVUE_VERSION
    assert lock["packages"]["node_modules/@niivue/niivue"]["version"] == NIIVUE_VERSION
    js = vendored_niivue().read_text(encoding="utf-8")
    assert js.startswith("(function(") and "globalThis" in js[:400]  # UMD: a classic script
    assert f'version:"{NIIVUE_VERSION}"' in js
    assert "import(" not in js  # no chunk loaded at run time
    built = ROOT / "web/node_modules/@niivue/niivue/dist" / NIIVUE_JS
    if built.exists():  # after `make niivue`: byte for byte what npm installed
        assert built.read_bytes() == vendored_niivue().read_bytes()


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
            probe = ctx.new_page()
            webgl2 = probe.evaluate("!!document.createElement('canvas').getContext('webgl2')")
            probe.close()
            if not webgl2:
                ctx.close()
                _unavailable(f"{exe} has no WebGL2 even through SwiftShader: NiiVue needs it")
            yield ctx
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, out: Path):
    """Open ``out``; return (page, errors, requested URLs) once the first case is drawn."""
    page = browser.new_page()
    errors: list[str] = []
    urls: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: urls.append(r.url))
    page.goto(out.as_uri())
    return page, errors, urls


@pytest.fixture
def viewer(browser, tmp_path):
    """A 3-case page; yield (page, errors, urls); assert no console error and no network."""
    cases = [
        make_case("case-b", "FP", p=0.7, label=0, seed=1, blob=(28, 10, 8), lesion=None),
        make_case("case-a", "TP", p=0.95, seed=0),
        make_case(EVIL, "TN", p=0.2, pred=0, label=0, seed=2, blob=(8, 8, 6)),
    ]
    out = tmp_path / "index.html"
    write_viewer(cases, out, meta={"model": "resnet10-test", "auc": 0.875})
    page, errors, urls = open_page(browser, out)
    ready = page.evaluate("window.radflowViewer.ready")
    assert ready is True, page.locator("#message").inner_text()
    yield page, errors, urls
    page.close()
    assert errors == []
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls


def canvas(page) -> np.ndarray:
    """The NiiVue canvas as drawn on screen, RGB."""
    from PIL import Image

    png = page.locator("#gl").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_browser_niivue_draws_ct_cam_and_outlines_from_file_url(viewer, tmp_path):
    page, _errors, urls = viewer
    assert page.evaluate("window.radflowViewer.currentCase") == "case-a"  # most confident TP
    assert page.evaluate("window.radflowViewer.nv.volumes.length") == 4  # CT, CAM, ROI, lesion
    # NiiVue loaded the CT at its own grid and put the crosshair on the CAM peak
    dims = page.evaluate("Array.from(window.radflowViewer.nv.volumes[0].hdr.dims.slice(1, 4))")
    assert dims == list(SHAPE)
    assert page.locator("#slider-axial").input_value() == str(BLOB[2])
    assert page.locator("#slider-coronal").input_value() == str(BLOB[1])
    assert page.locator("#slider-sagittal").input_value() == str(BLOB[0])
    assert "in lesion" in page.locator("#readout").inner_text()
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)

    on = canvas(page)
    assert (on.max(axis=2) > 40).mean() > 0.2, "canvas is blank"  # background is black
    coloured = np.abs(on[..., 0] - on[..., 2]) > 60
    assert coloured.sum() > 200, "no coloured CAM / outline pixels"

    page.locator("#toggle-cam").uncheck()
    off = canvas(page)
    assert np.abs(on - off).sum(axis=2).astype(bool).sum() > 200
    assert page.evaluate("window.radflowViewer.nv.volumes.length") == 3
    page.locator("#toggle-roi").uncheck()
    page.locator("#toggle-lesion").uncheck()
    page.locator("#toggle-crosshair").uncheck()
    grey = canvas(page)
    assert (np.ptp(grey, axis=2) <= 2).mean() > 0.95, "CT alone should be grey"

    page.locator("#slider-axial").fill(str(BLOB[2] - 8))
    assert page.locator("#label-axial").inner_text().startswith(f"z {BLOB[2] - 8} / 29")
    assert not np.array_equal(grey, canvas(page))  # another slice of a CT that changes with z

    page.locator("#toggle-cam").check()
    page.locator("#opacity").fill("100")
    strong = canvas(page)
    page.locator("#opacity").fill("10")
    assert not np.array_equal(strong, canvas(page))
    assert all(u.startswith("file://") for u in urls[:2])


def test_browser_switching_case_loads_its_data_on_demand(viewer):
    page, _errors, urls = viewer
    assert page.evaluate("window.pwned") is None
    ids = page.evaluate("[...document.querySelectorAll('.case-item')].map(e => e.dataset.case)")
    assert ids == ["case-a", "case-b", EVIL]  # TP, FP, TN
    before = canvas(page)
    page.locator(".case-item").nth(1).click()
    page.wait_for_function("window.radflowViewer.currentCase === 'case-b'")
    assert any(u.endswith("/" + case_file(1)) for u in urls)
    assert page.locator("#slider-axial").input_value() == "8"  # case-b's peak z
    assert not np.array_equal(before, canvas(page))
    assert "case-b" in page.locator("#case-title").inner_text()
    assert page.locator("#toggle-lesion").is_disabled()  # case-b has no lesion mask
    assert page.evaluate("window.radflowViewer.nv.volumes.length") == 3
    assert "0.875" in page.locator("#meta").inner_text()
    numbers = page.locator("#numbers").inner_text()
    for text in ("cam_mass_in_roi", "0.81", "cam_peak_raw", "3.25", "0.7", "test", "FP"):
        assert text in numbers

    page.keyboard.press("j")
    page.wait_for_function("window.radflowViewer.currentCase !== 'case-b'")
    assert page.locator("#case-title").inner_text() == EVIL
    page.keyboard.press("ArrowUp")
    page.wait_for_function("window.radflowViewer.currentCase === 'case-b'")
    assert page.locator(".case-item.selected").get_attribute("data-case") == "case-b"


def test_browser_triage_filter_hides_groups(viewer):
    page, _errors, _urls = viewer
    shown = "[...document.querySelectorAll('.case-item')].filter(e => e.offsetParent).length"
    assert page.evaluate(shown) == 3
    page.locator("#triage input[data-group='TP']").uncheck()
    assert page.evaluate(shown) == 2
    assert page.locator(".case-item[data-case='case-a']").is_hidden()
    assert page.locator(".group-head[data-group='TP']").is_hidden()
    # the case on screen was a TP: the page moves to the first case still listed
    page.wait_for_function("window.radflowViewer.currentCase === 'case-b'")
    assert "(2 of 3)" in page.locator("#case-count").inner_text()
    page.keyboard.press("k")  # j / k skip the hidden group
    page.wait_for_timeout(200)
    assert page.evaluate("window.radflowViewer.currentCase") == "case-b"
    page.locator("#triage input[data-group='TP']").check()
    assert page.evaluate(shown) == 3


def test_browser_missing_case_data_is_reported_on_the_page(browser, tmp_path):
    out = tmp_path / "index.html"
    write_viewer([make_case("a"), make_case("b", "FP", label=0, seed=1)], out)
    (tmp_path / case_file(1)).unlink()
    page, errors, _urls = open_page(browser, out)
    assert page.evaluate("window.radflowViewer.ready") is True
    page.locator(".case-item").nth(1).click()
    page.wait_for_function("document.getElementById('message').textContent !== ''")
    assert "cannot read review/case-0001.js" in page.locator("#message").inner_text()
    assert page.evaluate("window.radflowViewer.currentCase") == "a"
    page.close()
    # the failed file load is the only error
    assert errors and all("case-0001.js" in e or "ERR_FILE_NOT_FOUND" in e for e in errors), errors


def test_browser_views_are_radiological_and_click_cross_references(viewer):
    """Clicking near a corner of each view lands on the voxel of that corner in radiological
    convention: patient's right on screen left, anterior / superior up (sagittal: anterior
    left)."""
    page, _errors, _urls = viewer
    tiles = page.evaluate(
        "window.radflowViewer.nv.screenSlices.map(s => [s.axCorSag, ...s.leftTopWidthHeight])"
    )
    dpr = page.evaluate("window.devicePixelRatio")
    box = page.locator("#gl").bounding_box()
    # view -> (its tile code, RAS axis along screen x, along screen y, high end of x at left?)
    views = {"axial": (0, 0, 1, True), "coronal": (1, 0, 2, True), "sagittal": (2, 1, 2, True)}
    for name, (code, h_axis, v_axis, high_left) in views.items():
        left, top, width, height = next(t[1:] for t in tiles if t[0] == code)
        x = box["x"] + (left + 0.12 * width) / dpr  # near the left edge
        y = box["y"] + (top + 0.12 * height) / dpr  # near the top edge
        page.mouse.click(x, y)
        page.wait_for_timeout(100)
        vox = page.evaluate("window.radflowViewer.state.vox")
        h_frac = vox[h_axis] / (SHAPE[h_axis] - 1)
        v_frac = vox[v_axis] / (SHAPE[v_axis] - 1)
        assert (h_frac > 0.75) if high_left else (h_frac < 0.25), (name, vox)
        assert v_frac > 0.75, (name, vox)  # anterior (axial) / superior (others) is up
        slider = {0: "sagittal", 1: "coronal", 2: "axial"}
        assert page.locator(f"#slider-{slider[h_axis]}").input_value() == str(vox[h_axis])
