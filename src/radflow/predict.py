"""predict: a bundled model applied to new studies, with the bundle's preprocessing only.

* ``load_model(bundle)`` -> ``Predictor``: torch, the network and (on first use) the
  segmentation model load once; ``Predictor.predict(path)`` takes one study (a DICOM folder,
  or one NIfTI volume read as the bundle's ``input.modality``) through selection (a volume:
  ingest's header checks), convert, segment and mask with the settings recorded in the bundle and
  returns the probability, the prediction at the bundle's threshold and the Grad-CAM on the
  input's grid (``StudyPrediction``); a study that fails selection or QC raises
  ``status.CaseFailedError`` with its code and reason. Segmentation weights other than those
  the bundle's training masks came from (``bundle.segmenter_mismatch``) are refused at load.
* ``cohort_config``: the workflow config of a predict cohort (``results/private/predict/``, where
  the workflow's own per-case rules run on ``predict.raw_dir``, a DICOM tree or a NIfTI cohort
  sheet): the bundle's preprocessing, and an error naming every key where the project's config
  differs from it (``input.modality`` included), and other segmentation weights refused
  (``check_segment_weights``) before any study is segmented.
* ``predict``: the cohort stage: every selected case of the predict cohort's inventory is
  predicted (a case that failed a stage is listed in ``excluded.csv`` with its reason), CAMs and
  the review page are written, and with labels ``metrics.json`` holds the external validation
  at the bundle's threshold.

Probabilities go through ``inputs.Cache`` and ``model.predict`` as in evaluate, so a case gets
the same probability from both (tests/test_predict.py checks to 1e-5).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from radflow import bundle, paths, status
from radflow.io import write_json, write_table
from radflow.source import NIFTI_SUFFIXES, SHEET_SUFFIXES, InputSpec

# --------------------------------------------------------------------------- cohort config


def cohort_input(cfg: dict[str, Any], source: str) -> None:
    """Point a predict cohort's config at its input (``radflow.source``): a DICOM tree
    (``raw_dir``) or a NIfTI cohort sheet (``input.format nifti``, ``input.sheet``; its label
    column labels the new cohort). ``input.modality`` is the bundle's, set by the caller."""
    spec = InputSpec.resolve(
        {k: v for k, v in (cfg.get("input") or {}).items() if k not in ("format", "sheet")},
        source,
    )
    if spec.format == "nifti" and Path(source).suffix.lower() not in SHEET_SUFFIXES:
        raise ValueError(
            f"predict.raw_dir {source} is a NIfTI volume: a NIfTI cohort is a sheet (.csv) "
            "listing its volumes (one volume: radflow predict BUNDLE FILE)"
        )
    sheet = os.path.abspath(source) if spec.format == "nifti" else None
    cfg["input"] = {**(cfg.get("input") or {}), "format": spec.format, "sheet": sheet}
    # a NIfTI cohort does not read raw_dir; the sheet's folder stands in for the checks on it
    cfg["raw_dir"] = os.path.dirname(sheet) if sheet else os.path.abspath(source)


def cohort_config(
    config: Mapping[str, Any], meta: Mapping[str, Any], salt: str, weights_dir: str | None
) -> dict[str, Any]:
    """The config of the predict cohort's project folder: the project's config with the
    bundle's preprocessing, ``predict.raw_dir`` as input and ``predict.labels`` as labels.

    A project config whose preprocessing differs from the bundle's is an error naming every
    differing key: predictions are never made from a silent mix of two preprocessings.
    """
    diff = bundle.conflicts(config, meta["preprocessing"])
    if diff:
        raise ValueError(
            "the config's preprocessing differs from the model bundle's (predict uses the "
            f"bundle's; make the config agree or retrain): {'; '.join(diff)}"
        )
    pred = config["predict"]
    if not pred.get("raw_dir"):
        raise ValueError(
            "predict.raw_dir is not set: the new cohort's DICOM tree or NIfTI sheet (.csv)"
        )
    cfg = copy.deepcopy({k: v for k, v in config.items() if k != "predict"})
    cohort_input(cfg, pred["raw_dir"])
    labels = dict(pred.get("labels") or {})
    if labels.get("path"):
        labels["path"] = os.path.abspath(labels["path"])
    cfg["labels"] = {**cfg["labels"], "path": None, **labels}
    cfg["ids"] = {**cfg["ids"], "salt": salt}
    for name, values in bundle.recorded_preprocessing(meta["preprocessing"]).items():
        cfg[name] = _merge(cfg.get(name) or {}, values)
    if cfg["segment"]["backend"] == "precomputed":
        raise ValueError(
            "the bundle's segmentation is precomputed masks: predict_all needs the new "
            "cohort's masks, which it cannot make; segment it with totalsegmentator"
        )
    if weights_dir:
        cfg["segment"]["weights_dir"] = os.path.abspath(weights_dir)
    cfg["qc"] = {**cfg["qc"], "reference": None}  # the training cohort's references
    cfg["explain"] = {**cfg["explain"], "lesion_reference": None}
    return cfg


def write_cohort_config(
    bundle_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: Mapping[str, Any],
    salt: str,
    weights_dir: str | None = None,
) -> dict[str, Any]:
    """Verify the bundle and write the predict cohort's config (``cohort_config``) as YAML."""
    import yaml

    from radflow.io import write_text

    meta = bundle.verify(bundle_dir)
    cfg = cohort_config(config, meta, salt, weights_dir)
    check_segment_weights(meta, cfg["segment"])
    write_text(out, yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def check_segment_weights(meta: Mapping[str, Any], segment: Mapping[str, Any]) -> None:
    """Refuse (BundleError naming the folder and the differing digest) a predict cohort whose
    segmentation weights (config section ``segment``) are not those of the bundle's training
    masks: their ``SHA256SUMS`` (checked again when the model loads), before any study is
    segmented."""
    from radflow.segment import SegmentSettings, model_digests

    used = None
    if segment["backend"] == "totalsegmentator":
        used = model_digests(SegmentSettings.from_config(dict(segment)), declared=True)
    why = bundle.segmenter_mismatch(meta.get("segmenter"), used, str(segment["weights_dir"]))
    if why:
        raise bundle.BundleError(why)


def check_cohort_segmenter(
    meta: Mapping[str, Any], work: str | os.PathLike, case_ids: Sequence[str], batches: int
) -> None:
    """Refuse predictions on masks from other segmentation weights than the bundle's: the
    digests each segment group of the predicted cases recorded (no weights hashed again)."""
    from radflow.segment import group_of

    for g in sorted({group_of(c, batches) for c in case_ids}):
        path = Path(work) / paths.SEG_GROUP.format(group=g)
        # no record: segment.backend none made no masks (and used no weights)
        rec = json.loads(path.read_text()) if path.is_file() else {}
        where = str((rec.get("settings") or {}).get("weights_dir", ""))
        why = bundle.segmenter_mismatch(meta.get("segmenter"), rec.get("weights_sha256"), where)
        if why:
            raise bundle.BundleError(why)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def stage_settings(
    meta: Mapping[str, Any], device: str = "auto", weights_dir: str | None = None
) -> dict[str, Any]:
    """A bundle's preprocessing as each stage takes it (``from_dict`` or a CLI's JSON
    ``--settings``): ``selection`` (ingest's rules with convert's series checks),
    ``max_image_mb``, ``convert``, ``segment`` (its runtime keys set: ``device``, and
    ``weights_dir``, by default the bundle's), ``mask`` and ``qc`` (plausibility; {} gives the
    defaults a bundle that did not record it was made with). The one reading of a bundle's
    settings, for ``Predictor`` and bench/predict_speed.py."""
    pre = meta["preprocessing"]
    # (bundles written before allow_phantom was a runtime key recorded it)
    seg = {k: v for k, v in pre["segment"].items() if k not in bundle.RUNTIME_KEYS["segment"]}
    seg["device"] = device
    seg["weights_dir"] = weights_dir or meta.get("segment_weights_dir") or ""
    return {
        "selection": {
            **pre["ingest"]["selection"],
            "max_missing_slices": pre["convert"]["max_missing_slices"],
            "gantry_tilt": pre["convert"]["gantry_tilt"],
        },
        "max_image_mb": float(pre["ingest"]["max_image_mb"]),
        "convert": dict(pre["convert"]),
        "segment": seg,
        "mask": dict(pre["mask"]),
        "qc": dict(pre.get("qc") or {}),
    }


# --------------------------------------------------------------------------- one study


@dataclass
class StudyPrediction:
    """One study's prediction: probability, class at the bundle's threshold, and the CAM."""

    probability: float
    prediction: int
    threshold: float
    cam: Any  # nibabel image: the normalised Grad-CAM on the input's grid (DICOM or NIfTI)
    cam_model: Any  # the same CAM on the masked volume's grid the network saw
    series: str  # why this series of the study was chosen (ingest's reason)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    def to_dict(self) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "prediction": self.prediction,
            "threshold": self.threshold,
            "series": self.series,
            "seconds": self.seconds,
        }


class _One:
    """A one-case stand-in for ``inputs.Cache`` (what ``model.predict`` iterates)."""

    def __init__(self, x: Any) -> None:
        self.x, self.device = x, x.device

    def __len__(self) -> int:
        return 1

    def batch(self, idx: Any) -> Any:
        return self.x


class Predictor:
    """A loaded bundle: call ``predict(path)`` for each study (see the module docstring)."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        device: str = "auto",
        threads: int = 1,
        weights_dir: str | None = None,
        volume_index: int | None = None,
    ) -> None:
        import torch

        from radflow import inputs
        from radflow.convert import ConvertSettings
        from radflow.explain import ExplainSettings
        from radflow.ingest import SelectionRules
        from radflow.mask import MaskSettings
        from radflow.model import resolve_device
        from radflow.plausibility import QcSettings
        from radflow.segment import SegmentSettings, model_digests

        torch.set_num_threads(threads)
        self.threads = threads
        self.device = resolve_device(device)
        self.model, self.ck, self.meta = bundle.load(bundle_dir, self.device)
        self.spec = inputs.InputSpec.from_checkpoint(self.ck)
        self.threshold = float(self.meta["threshold"])
        st = stage_settings(self.meta, device, weights_dir)
        self.max_image_mb = st["max_image_mb"]
        self.rules = SelectionRules.from_dict(st["selection"])
        self.convert = ConvertSettings.from_dict(st["convert"])
        backend = st["segment"]["backend"]
        if backend == "precomputed":
            raise bundle.BundleError(
                "the bundle's training masks were precomputed (segment.backend precomputed): "
                "a study's mask cannot be made for it here; use snakemake predict_all with a "
                "sheet that gives each volume's mask"
            )
        # backend none: no segmentation, the whole volume is the input (mask.enabled false)
        self.segment = SegmentSettings.from_dict(st["segment"]) if backend != "none" else None
        why = bundle.segmenter_mismatch(
            self.meta.get("segmenter"),
            model_digests(self.segment, declared=True) if self.segment else None,
            self.segment.weights_dir if self.segment else "",
        )
        if why:
            raise bundle.BundleError(why)
        self.mask = MaskSettings.from_dict(st["mask"])
        # the training cohort's plausibility QC (defaults for bundles that did not record it)
        self.qc = QcSettings.from_dict(st["qc"])
        # a NIfTI volume's intensities are read as the training cohort's were (CT: HU)
        modality = bundle.recorded_preprocessing(self.meta["preprocessing"])["input"]["modality"]
        self.volume_spec = InputSpec(format="nifti", modality=modality, volume_index=volume_index)
        self.explain = ExplainSettings.from_dict({**self.meta["explain"], "device": device})

    # ------------------------------------------------------------------ stages of one study

    def select(self, folder: Path) -> tuple[list[str], str, str]:
        """(files, SeriesInstanceUID, reason) of the series selection picks in a study."""
        from radflow import ingest

        files = ingest.mark_duplicates(
            ingest.scan(folder, threads=self.threads, max_image_mb=self.max_image_mb)
        )
        if files.empty:
            raise status.CaseFailedError("NO_DICOM", "no readable DICOM file in the study")
        series = ingest.select_series(
            ingest.summarize_series(files, self.rules, self.max_image_mb), self.rules
        )
        chosen = series[series["selected"]]
        if chosen.empty:
            why = "; ".join(f"series {r.series_number}: {r.reason}" for r in series.itertuples())
            raise status.CaseFailedError("NOT_SELECTED", f"no series passes selection ({why})")
        if len(chosen) > 1:
            raise status.CaseFailedError(
                "SEVERAL_STUDIES", f"{len(chosen)} studies in one input: give one study"
            )
        r = chosen.iloc[0]
        good = files[ingest.usable(files) & (files["SeriesInstanceUID"] == r["SeriesInstanceUID"])]
        return sorted(good["path"]), str(r["SeriesInstanceUID"]), str(r["reason"])

    def check_volume(self, path: Path) -> str:
        """Why one NIfTI volume is usable (ingest's header checks), or VolumeRefusedError."""
        from radflow import nifti_input

        img = nifti_input.load(path)
        info = nifti_input.check_image(img, self.volume_spec.volume_index, self.max_image_mb)
        dims = "x".join(map(str, info.shape))
        return f"NIfTI volume {dims}, {'x'.join(f'{z:g}' for z in info.zooms)} mm"

    def predict(
        self, path: str | os.PathLike, out_dir: str | os.PathLike | None = None
    ) -> StudyPrediction:
        """One study (a DICOM folder or a NIfTI volume) -> ``StudyPrediction``; intermediate
        volumes go to
        ``out_dir`` when given (else a temporary folder, removed)."""
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"no study at {src}")
        if src.is_file() and not src.name.lower().endswith(NIFTI_SUFFIXES):
            why = "not a NIfTI volume (.nii, .nii.gz): give a DICOM study folder or a volume"
            raise status.CaseFailedError("NOT_A_STUDY", why)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            return self._predict(src, Path(out_dir))
        with tempfile.TemporaryDirectory(prefix="radflow-predict-") as tmp:
            return self._predict(src, Path(tmp))

    def _predict(self, src: Path, work: Path) -> StudyPrediction:
        import nibabel as nib
        import torch

        from radflow import explain, inputs, model, resampling
        from radflow.convert import convert
        from radflow.mask import mask
        from radflow.segment import segment_image

        t: dict[str, float] = {}
        t0 = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t0
            now = time.perf_counter()
            t[name] = round(now - t0, 4)
            t0 = now

        nifti = src.is_file()
        image = work / "image.nii.gz"
        if nifti:  # one volume: ingest's header checks, then NIfTI conversion
            reason = self.check_volume(src)
            filelist, uid, spec = src, None, self.volume_spec
        else:
            files, uid, reason = self.select(src)
            filelist, spec = work / "files.json", None
            filelist.write_text(json.dumps(files))
        lap("select")
        try:
            sidecar = convert(
                filelist,
                image,
                self.convert,
                work / "image.json",
                series_uid=uid,
                threads=self.threads,
                max_image_mb=self.max_image_mb,
                input_spec=spec,
            )
        except status.CaseFailedError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line, as the cohort's record says it
            if status.is_environmental(exc):
                raise
            rec = status.failure("convert", exc)
            raise status.CaseFailedError(rec["reason_code"], rec["reason"]) from None
        lap("convert")
        seg: Path | None = None
        if self.segment is not None:
            seg = work / "seg.nii.gz"
            segment_image(image, seg, self.segment, work / "seg.json", threads=self.threads)
        lap("segment")
        masked, roi = work / "masked.nii.gz", work / "roi.nii.gz"
        rec = mask(
            image, seg, masked, self.mask, roi, work / "mask.json", threads=self.threads,
            qc=self.qc,
        )  # fmt: skip
        if not status.is_ok(rec) or not rec.get("usable"):
            raise status.CaseFailedError(rec.get("reason_code") or "ROI", rec.get("reason", ""))
        lap("mask")
        stored = inputs.read_case({"masked": masked, "roi": roi}, self.spec.channels)
        x = self.spec.network_input(torch.from_numpy(stored[None]).to(self.device))
        prob = float(model.predict(self.model, _One(x), 1, self.device.type == "cuda")[0])
        lap("model")
        s = self.explain
        cam_zyx, _ = explain.compute_cam(
            self.model, x, s.method, s.target_layer, s.target_class, s.score
        )
        cam = explain.to_ras(cam_zyx)
        m_aff = nib.load(str(masked)).affine
        if nifti:  # the file's own grid (before convert's reorientation to RAS+)
            src_affine = np.asarray(sidecar["source"]["affine"])
            src_shape = tuple(sidecar["source"]["shape"][:3])
        else:
            src_affine = np.asarray(sidecar["geometry"]["source_affine"])
            src_shape = tuple(sidecar["geometry"]["source_shape"])
        native = resampling.resample(
            cam, m_aff, src_affine, src_shape, order=1, fill=0.0, dtype=np.float32
        )
        lap("cam")
        return StudyPrediction(
            probability=prob,
            prediction=int(prob >= self.threshold),
            threshold=self.threshold,
            cam=nib.Nifti1Image(native, src_affine),
            cam_model=nib.Nifti1Image(cam, m_aff),
            series=reason,
            seconds=t,
        )


def load_model(
    bundle_dir: str | os.PathLike = paths.MODEL_DIR,
    device: str = "auto",
    threads: int = 1,
    weights_dir: str | None = None,
    volume_index: int | None = None,
) -> Predictor:
    """A verified bundle, loaded once for many ``predict(path)`` calls (``volume_index``: the
    volume taken from a 4-D NIfTI input, as ``input.volume_index``; None refuses 4-D)."""
    return Predictor(bundle_dir, device, threads, weights_dir, volume_index)


def predict_study(
    bundle_dir: str | os.PathLike,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "auto",
    threads: int = 1,
    weights_dir: str | None = None,
) -> dict[str, Any]:
    """One study through a bundle (``radflow predict``): ``prediction.json`` (probability,
    prediction, threshold, seconds per stage) and ``cam.nii.gz`` (the CAM on the input's grid)
    in ``out_dir``; a refused study's ``prediction.json`` says why, and CaseFailedError is
    raised."""
    from radflow.io import save_nifti

    out = Path(out_dir)
    model = load_model(bundle_dir, device, threads, weights_dir)
    try:
        res = model.predict(source)
    except status.CaseFailedError as exc:
        write_json(out / "prediction.json", status.failure("predict", exc))
        raise
    save_nifti(np.asanyarray(res.cam.dataobj), res.cam.affine, out / "cam.nii.gz")
    info = res.to_dict()
    write_json(out / "prediction.json", info)
    return info


# --------------------------------------------------------------------------- a cohort


def _cohort_cfg(work: str | os.PathLike) -> dict[str, Any]:
    """The config of a predict cohort's project folder (``write_cohort_config``)."""
    import yaml

    return yaml.safe_load((Path(work) / paths.PREDICT_CONFIG_NAME).read_text())


def cohort_cases(work: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cases to predict, excluded) of a predict cohort's project folder after mask_all.

    Cases carry the manifest's file columns (relative to ``work``) and the label (NaN when the
    sheet has none); excluded rows say at which stage and why, as manifests/excluded.csv does.
    """
    from radflow.labels import LabelSpec
    from radflow.manifest import exclusion, ingest_exclusions, relabel

    work = Path(work)
    inv = pd.read_parquet(work / paths.INVENTORY_PARQUET)
    # labels join through the private id map, as in the manifest (never at ingest)
    cfg = _cohort_cfg(work)
    spec = LabelSpec.from_dict(cfg["labels"])
    if spec.path:
        inv = relabel(inv, spec, work / paths.ID_MAP_PARQUET)
    excluded = ingest_exclusions(inv)
    rows = []
    for r in inv[inv["selected"]].itertuples():
        rec = status.read(work / paths.for_case(paths.MASK_STATUS, r.case_id))
        why = exclusion(rec)
        if why is not None:
            excluded.append({"id": r.case_id, "subject_id": r.subject_id, **why})
            continue
        has_label = "label" in inv and not pd.isna(r.label)  # has_label may be NA
        rows.append(
            {
                "case_id": r.case_id,
                "subject_id": r.subject_id,
                "study_id": r.study_id,
                "label": float(r.label) if has_label else np.nan,
                **paths.case_files(r.case_id),
            }
        )
    cols = ["case_id", "subject_id", "study_id", "label", *paths.CASE_FILES]
    cases = pd.DataFrame(rows, columns=cols).sort_values("case_id").reset_index(drop=True)
    excl = pd.DataFrame(excluded, columns=["id", "subject_id", "stage", "reason_code", "reason"])
    return cases, excl


def predict(
    bundle_dir: str | os.PathLike,
    work: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "auto",
    threads: int = 1,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Predict and explain every usable case of a predict cohort (``work``: its project folder
    after mask_all); writes predictions.csv, excluded.csv, metrics.json and explain/."""
    import sys

    import torch
    from tqdm import tqdm

    from radflow import evaluate, explain, inputs, model
    from radflow.mask import MaskSettings

    torch.set_num_threads(threads)
    work, out = Path(work), Path(out_dir)
    dev = model.resolve_device(device)
    net, ck, meta = bundle.load(bundle_dir, dev)
    thr = float(meta["threshold"])
    cases, excluded = cohort_cases(work)
    batches = _cohort_cfg(work)["segment"]["batches"] or 0
    check_cohort_segmenter(meta, work, list(cases["case_id"]), int(batches))
    cache_rows = cases.assign(label=cases["label"].fillna(0).astype(int))
    cache = inputs.Cache(cache_rows, work, inputs.InputSpec.from_checkpoint(ck), dev)
    cases["probability"] = model.predict(net, cache, 4, dev.type == "cuda")
    cases["prediction"] = (cases["probability"] >= thr).astype(int)
    cases["threshold"] = thr
    cases["label"] = cases["label"].astype("Int64")
    write_table(
        cases[
            ["case_id", "subject_id", "study_id", "probability", "prediction", "threshold"]
        ].assign(label=cases["label"]),
        out / "predictions.csv",
    )
    write_table(excluded, out / "excluded.csv")

    settings = explain.ExplainSettings.from_dict({**meta["explain"], "device": device})
    models = (net, explain.random_model_like(ck, settings.random_seed).to(dev), ck)
    cams = out / "explain"
    cams.mkdir(parents=True, exist_ok=True)
    jsons = []
    for r in tqdm(list(cases.itertuples()), desc="predict", file=sys.stderr, mininterval=5):
        label = None if pd.isna(r.label) else int(r.label)
        explain.explain_case(
            models,
            work / r.masked,
            work / r.roi,
            work / r.image,
            cams,
            r.case_id,
            settings,
            prediction={
                "probability": float(r.probability),
                "prediction": int(r.prediction),
                "label": label,
                "split": "predict",
                "threshold": thr,
            },
            fill_hu=MaskSettings.from_dict(meta["preprocessing"]["mask"]).background_hu,
        )
        jsons.append(cams / f"{r.case_id}.json")
    explain.report(jsons, cams, root=work)

    labelled = cases[cases["label"].notna()]
    result: dict[str, Any] = {
        "threshold": thr,
        "threshold_source": f"the bundle's: {meta['threshold_source']}",
        "bundle_config_hash": meta["config_hash"],
        "n_cases": int(len(cases)),
        "n_excluded": int(len(excluded)),
        "n_labelled": int(len(labelled)),
        "n_predicted_positive": int(cases["prediction"].sum()),
        "external_validation": evaluate.binary_metrics(
            labelled["label"].to_numpy(int), labelled["probability"].to_numpy(), thr, bootstrap
        )
        if len(labelled)
        else None,
    }
    write_json(out / "metrics.json", result)
    return result
