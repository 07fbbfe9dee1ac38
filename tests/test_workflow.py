"""The Snakemake workflow end to end on a small demo cohort: ingest and convert."""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
import yaml

from radflow.demo.cohort import _folder, plan_cohort

from .conftest import SALT, SMALL, snakemake, tree_digest, workdir

pytestmark = pytest.mark.slow
BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def run(workflow_run):
    return workflow_run


def test_workflow_runs_ingest_and_convert(run):  # and segment and mask
    work, proc, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    inv = pd.read_parquet(work / "results/inventory/series.parquet")
    sel = inv[inv["selected"]]
    produced = sorted(p.name[: -len(".nii.gz")] for p in (work / "results/nifti").glob("*.nii.gz"))
    assert produced == sorted(sel["case_id"])  # rejected series never became jobs
    for cid, series_id in zip(sel["case_id"], sel["series_id"], strict=True):
        img = nib.load(work / f"results/nifti/{cid}.nii.gz")
        # the sidecar's series pseudonym is the inventory's (convert reads it there itself)
        sidecar = json.loads((work / f"results/nifti/{cid}.json").read_text())
        assert sidecar["series_id"] == series_id and sidecar["case_id"] == cid
        assert img.get_data_dtype() == "int16"
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert (work / f"logs/convert/{cid}.log").exists()
        assert (work / f"benchmarks/convert/{cid}.tsv").exists()
        seg = nib.load(work / f"results/seg/{cid}.nii.gz")
        assert seg.shape == img.shape and (seg.affine == img.affine).all()
        masked_img = nib.load(work / f"results/masked/{cid}.nii.gz")
        assert masked_img.shape == (32, 32, 32) and masked_img.get_data_dtype() == "int16"
        assert (work / f"results/qc/{cid}.png").stat().st_size > 1000


def _job_spans(work: Path, rule: str) -> list[tuple[datetime, datetime]]:
    """(start, end) of every ``rule`` job in the run's Snakemake log (1 s resolution)."""
    (log,) = sorted((work / ".snakemake" / "log").glob("*.snakemake.log"))[:1]
    stamp, starts, spans, current = None, {}, [], None
    for line in log.read_text().splitlines():
        if m := re.fullmatch(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]", line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", line):
            current = m.group(1)
        elif m := re.match(r"Finished jobid: (\d+)", line):
            if m.group(1) in starts:
                spans.append((starts.pop(m.group(1)), stamp))
        elif line and not line[0].isspace():  # any other block (an error's, say) ends the job's
            current = None
        elif (m := re.match(r"\s+jobid: (\d+)", line)) and current == rule:
            starts[m.group(1)] = stamp
    return spans


def test_segmentation_batches_run_side_by_side(run):
    """On 2 cores the 1-thread segmentation batches run two at a time. With convert.threads 2 no
    conversion could start while a batch held one core, so the next batch (which waits for its
    conversions) never became ready in time: in the demo the batches ran one after another."""
    work, proc, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    spans = sorted(_job_spans(work, "segment"))
    assert len(spans) >= 2, spans
    assert any(b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :]), spans


def test_training_and_evaluation_ran(run):
    work, proc, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    metrics = json.loads((work / "results/eval/metrics.json").read_text())
    assert "validation" in metrics["threshold_source"]
    assert metrics["test"]["n"] >= 1
    preds = pd.read_csv(work / "results/eval/predictions.csv")
    assert set(preds["split"]) == {"train", "val", "test"}
    # the classical baseline beside the network, on the same cases and splits
    base = metrics["baseline"]
    assert base["test"]["n"] == metrics["test"]["n"], base
    assert base["n_train"] == ((preds["split"] == "train") & preds["label"].notna()).sum()
    assert preds["baseline_probability"].between(0, 1).all()
    hist = pd.read_csv(work / "results/train/history.csv")
    assert len(hist) == 2


def test_segmentation_qc_has_dice_against_the_phantom_truth(run):
    work, proc, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(work / "results/qc/segmentation.csv")
    liver = table[table["roi"] == "liver"]
    assert len(liver) == len(list((work / "results/masked").glob("case-*_roi.nii.gz")))
    # the test cohort is 32x32 pixels (~12 mm): coarse, and its textured parenchyma (the harder
    # demo) is further from what the phantom model learnt: median Dice 0.39 there, against 0.96
    # on the demo's 96x96; a misaligned or flipped label map scores near 0
    assert liver["dice"].notna().all() and liver["dice"].median() > 0.3
    assert (liver["volume_ml"] > 100).all()


def test_rerun_has_nothing_to_do(run):
    work, proc, _ = run
    assert proc.returncode == 0
    again = snakemake(work, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def _planned(work: Path, *args: str) -> dict[str, int]:
    """Jobs per rule that ``snakemake -n`` plans (with extra arguments)."""
    proc = snakemake(work, "-n", "--quiet", "rules", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m:
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def _with_config(work: Path, edit) -> Path:
    cfg = yaml.safe_load((work / "config" / "config.yaml").read_text())
    edit(cfg)
    path = work / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_forcerun_train_reruns_train_onward_only(run):
    work, proc, _ = run
    assert proc.returncode == 0
    jobs = _planned(work, "--forcerun", "train")
    assert jobs.get("train") == 1 and jobs.get("evaluate") == 1
    assert jobs.get("explain") == 1
    for upstream in ("ingest", "convert", "segment", "mask", "manifest"):
        assert upstream not in jobs, jobs


def test_mask_parameter_change_reruns_mask_onward_only(run):
    work, proc, _ = run
    assert proc.returncode == 0
    changed = _with_config(work, lambda c: c["mask"].update(dilation_mm=7.0))
    jobs = _planned(work, "--configfile", str(changed))
    n_cases = len(list((work / "results/masked").glob("case-*_roi.nii.gz")))
    assert jobs.get("mask") == n_cases and jobs.get("manifest") == 1 and jobs.get("train") == 1
    for upstream in ("ingest", "convert", "segment"):
        assert upstream not in jobs, jobs


def test_new_label_sheet_reruns_manifest_onward_only(run, demo_cohort):
    work, proc, _ = run
    assert proc.returncode == 0
    sheet = pd.read_csv(demo_cohort / "labels.csv", dtype=str)
    sheet.loc[0, "label"] = "1" if sheet.loc[0, "label"] == "0" else "0"
    new = work / "labels_v2.csv"
    sheet.to_csv(new, index=False)
    changed = _with_config(work, lambda c: c["labels"].update(path=str(new)))
    jobs = _planned(work, "--configfile", str(changed))
    assert jobs.get("manifest") == 1 and jobs.get("train") == 1 and jobs.get("evaluate") == 1
    for upstream in ("ingest", "convert", "segment", "mask"):
        assert upstream not in jobs, jobs
    # and explain settings do not touch the manifest or the model
    jobs = _planned(work, "--configfile", str(_with_config(work, _other_cam_method)))
    assert jobs.get("explain") == 1
    assert not {"manifest", "train", "evaluate"} & set(jobs), jobs


def _other_cam_method(cfg: dict) -> None:
    """A CAM method other than the configured one (an explain setting that changes)."""
    cfg["explain"]["method"] = "hirescam" if cfg["explain"]["method"] != "hirescam" else "gradcam"


def test_explanations_and_review_page(run):
    work, proc, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    cases = pd.read_parquet(work / "manifests/cases.parquet")
    shown = sorted(cases.loc[cases["split"].isin(["val", "test"]), "case_id"])
    assert shown
    for cid in shown:
        masked_img = nib.load(work / f"results/masked/{cid}.nii.gz")
        cam = nib.load(work / f"results/explain/{cid}_cam.nii.gz")
        assert cam.shape == masked_img.shape and (cam.affine == masked_img.affine).all()
        ct = nib.load(work / f"results/nifti/{cid}.nii.gz")
        on_ct = nib.load(work / f"results/explain/{cid}_cam_ct.nii.gz")
        assert on_ct.shape == ct.shape and (on_ct.affine == ct.affine).all()
        info = json.loads((work / f"results/explain/{cid}.json").read_text())
        assert info["group"] in {"TP", "FP", "FN", "TN"}
    faith = json.loads((work / "results/explain/faithfulness.json").read_text())
    assert faith["n_cases"] == len(shown)
    page = (work / "results/explain/index.html").read_text()
    assert all(cid in page for cid in shown) and "https://" not in page


def test_report_has_captions_and_gradcam_gallery(run):
    import zipfile

    work, proc, _ = run
    assert proc.returncode == 0
    rep = snakemake(work, "--report", "report.zip")
    assert rep.returncode == 0, rep.stderr[-3000:]
    with zipfile.ZipFile(work / "report.zip") as z:
        names = z.namelist()
        html = next(z.read(n) for n in names if n.endswith("report.html")).decode()
    pngs = [n for n in names if re.search(r"/case-[0-9a-f]{12}\.png$", n)]
    n_cases = len(list((work / "results/masked").glob("case-*_roi.nii.gz")))
    n_explained = len(list((work / "results/explain").glob("case-*_cam.nii.gz")))
    assert len(pngs) == n_cases + n_explained  # QC pictures and the Grad-CAM gallery
    assert any(n.endswith("/index.html") for n in names)
    assert any(n.endswith("/faithfulness.png") for n in names)
    for needle in ("Grad-CAM", "review and faithfulness", "Segmentation QC", "Youden"):
        assert needle in html, needle  # categories and captions from workflow/report/*.rst


def test_raw_tree_unchanged(run, demo_cohort):
    _, proc, before = run
    assert proc.returncode == 0
    assert tree_digest(demo_cohort / "raw") == before


def _texts(root: Path, private: Path):
    for dirpath, _dirs, files in os.walk(root):
        if Path(dirpath).is_relative_to(private):
            continue
        for name in files:
            p = Path(dirpath) / name
            if name.endswith(".parquet"):
                yield p, pd.read_parquet(p).to_csv()
            elif name.endswith(".gz"):
                yield p, gzip.decompress(p.read_bytes()).decode("latin-1")
            else:
                yield p, p.read_bytes().decode("latin-1")


def test_no_phi_outside_private(run, demo_cohort):
    work, proc, _ = run
    assert proc.returncode == 0
    needles = set()
    for s in plan_cohort(SMALL):
        needles |= {s.patient_id, s.name, s.name.replace("^", " "), _folder(s.name)}
        if len(_folder(s.patient_id)) >= 6:  # "../../etc" folds to "etc": too short to search
            needles.add(_folder(s.patient_id))
        for st in s.studies:
            needles.add(st.accession)
    studies = pd.read_csv(demo_cohort / "studies.csv")
    needles |= set(studies["StudyInstanceUID"])
    dates = {s.birth_date for s in plan_cohort(SMALL)}
    # one pass of one pattern a file (the checkpoints alone are ~0.8 GB): a loop of `in` tests
    # and a lookbehind regex per birth date took minutes; a date's digits must be present for
    # its regex to match, so the regex runs only where a plain search found them
    phi = re.compile("|".join(re.escape(n) for n in sorted(needles | {SALT}, key=len)[::-1]))

    def check(text: str, where: object) -> None:
        hit = phi.search(text)
        assert hit is None, f"{hit.group()!r} found in {where}"
        for d in dates:
            if d in text:
                assert not re.search(rf"(?<!\d){d}(?!\d)", text), f"birth date in {where}"

    scanned = 0
    # .snakemake holds every job's command line, params and input list (metadata) and the run
    # logs; report.zip is written by test_report_has_captions_and_gradcam_gallery when it ran
    for sub in ("results", "logs", "benchmarks", ".snakemake", "report.zip"):
        if sub == "report.zip" and (work / sub).exists():
            import zipfile

            with zipfile.ZipFile(work / sub) as z:
                text = b"".join(z.read(n) for n in z.namelist()).decode("latin-1")
            hit = phi.search(text)
            assert hit is None, f"{hit.group()!r} found in report.zip"
            continue
        for path, text in _texts(work / sub, work / "results" / "private"):
            scanned += 1
            check(text, path)
    assert scanned > 20
    assert "../../etc" in (work / "results/private/id_map.csv").read_text()


def test_unknown_roi_name_stops_the_workflow_at_start(demo_cohort, tmp_path):
    work = workdir(tmp_path, demo_cohort)
    cfg = yaml.safe_load((work / "config" / "config.yaml").read_text())
    cfg["mask"]["rois"] = ["livers"]
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "-n")
    assert proc.returncode != 0
    assert "unknown ROI name(s) 'livers' (did you mean liver" in proc.stdout + proc.stderr


def test_manifests_are_written_and_consistent(run):
    work, proc, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    from radflow import manifest

    cases = manifest.read(work / "manifests/cases.parquet")
    csv = manifest.read(work / "manifests/cases.csv")
    assert list(cases.columns) == list(csv.columns) == manifest.CASE_COLUMNS
    assert len(cases) == len(csv)
    assert (cases.groupby("subject_id")["split"].nunique() == 1).all()
    assert set(cases["split"]) == {"train", "val", "test"}
    for col in ("image", "label_map", "masked", "roi", "qc"):
        assert all((work / p).exists() for p in cases[col])
    excluded = pd.read_csv(work / "manifests/excluded.csv")
    assert "ingest" in set(excluded["stage"]) and "label" not in set(excluded["stage"])
    # the subject the sheet leaves out is a case with an empty label, flagged no_label
    unlabelled = cases[cases["label"].isna()]
    assert len(unlabelled) >= 1 and unlabelled["flags"].str.contains("no_label").all()
    # qc.implausible: flag (conftest): the cohort's field of view cuts the liver; the flagged
    # cases stay, their flags in the manifest
    assert cases["flags"].str.contains("liver:truncated").any()
    inv = pd.read_parquet(work / "results/inventory/series.parquet")
    assert len(excluded) + len(cases) == len(inv)  # every series is accounted for
    for split in ("train", "val", "test"):
        part = pd.read_csv(work / f"manifests/split_{split}.csv")
        assert set(part["case_id"]) == set(cases.loc[cases["split"] == split, "case_id"])


def test_monai_reads_the_datalist(run):
    work, proc, _ = run
    assert proc.returncode == 0
    from monai.data import load_decathlon_datalist

    items = load_decathlon_datalist(
        str(work / "manifests/datalist.json"), is_segmentation=False, data_list_key="training"
    )
    assert items and all(Path(i["image"]).exists() for i in items)
    assert {i["label"] for i in items if "label" in i} <= {0, 1}
    val = load_decathlon_datalist(
        str(work / "manifests/datalist.json"), is_segmentation=False, data_list_key="validation"
    )
    assert not {i["case_id"] for i in items} & {i["case_id"] for i in val}


def test_case_dataset_yields_tensors(run):
    work, proc, _ = run
    assert proc.returncode == 0
    from radflow.data import CaseDataset

    ds = CaseDataset(work / "manifests/cases.parquet", split="train", channels=("image", "roi"))
    x, label, case_id = ds[0]
    assert tuple(x.shape) == (2, 32, 32, 32) and str(x.dtype) == "torch.float32"
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(x[1].unique().tolist()) <= {0.0, 1.0} and x[1].sum() > 0
    assert label in (0, 1) and case_id.startswith("case-")
    assert len(ds) == len(ds.labels)
