"""Hostile inputs (issue 21): formula injection, orphan temporaries and a full disk, memory
bombs, odd file names and permissions, and raw paths kept out of public outputs and logs."""

from __future__ import annotations

import csv
import errno
import io as stdio
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.filewriter import write_dataset, write_file_meta_info

from radflow import convert, dicomsafe, ingest, io, paths
from radflow.demo import SeriesSpec, plan_cohort, write_series
from radflow.demo import cohort as demo

from .conftest import REPO, SALT, SMALL

PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
HOSTILE = {
    "manufacturer": "=cmd|' /C calc'!A0",
    "description": '=HYPERLINK("http://x")',
    "name": "@SUM(1+1)*cmd|' /C calc'!A0",
    "accession": "+1-2+cmd|' /C calc'!A0",
}


def _series(
    folder: Path,
    tag: str,
    *,
    n: int = 22,
    matrix: int = 16,
    rle: bool = False,
    truncate: int | None = None,
    description: str = "Abdomen 1.5 B30f",
    manufacturer: str | None = None,
    name: str | None = None,
    accession: str | None = None,
) -> list[Path]:
    """A small eligible axial CT series (its own study) written by the demo's writer."""
    subj = plan_cohort(SMALL)[0]
    study = subj.studies[0]
    if manufacturer is not None:
        study = replace(study, vendor=(manufacturer, *study.vendor[1:]))
    if accession is not None:
        study = replace(study, accession=accession)
    if name is not None:
        subj = replace(subj, name=name)
    spec = SeriesSpec(
        number=2,
        description=description,
        kernel="B30f",
        rows=matrix,
        cols=matrix,
        pixel_spacing=(2.0, 2.0),
        thickness=1.5,
        n_slices=n,
        center=(0.0, 0.0, -50.0),
        rle=rle,
        truncate_file=truncate,
    )
    study_uid, series_uid = demo._uid("study", tag), demo._uid("series", tag)
    return write_series(folder, subj.phantom, spec, subj, study, study_uid, series_uid, 1)


def _ingest(raw: Path, out: Path, **kw) -> pd.DataFrame:
    return ingest.ingest(
        raw,
        out / "inventory",
        out / "private",
        ingest.SelectionRules(),
        ingest.LabelSpec(),
        SALT,
        threads=1,
        **kw,
    )


def _file_list(out: Path, case_id: str) -> Path:
    return (
        out
        / "private"
        / Path(paths.FILE_LIST).relative_to(paths.PRIVATE).parent
        / (case_id + ".json")
    )


# --------------------------------------------------------------------------- 1. formulas


def test_neutralise_formulas_touches_only_formula_text():
    df = pd.DataFrame(
        {
            "text": ["=1+1", "+x", "-x", "@x", "\tx", "\rx", "ok", "-1024", "'=x", None],
            "number": [-1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        }
    )
    out = io.neutralise_formulas(df)
    assert list(out["text"][:6]) == ["'=1+1", "'+x", "'-x", "'@x", "'\tx", "'\rx"]
    assert list(out["text"][6:9]) == ["ok", "-1024", "'=x"]  # a plain number stays a number
    assert pd.isna(out["text"][9])
    assert out["number"].tolist() == df["number"].tolist() and out["number"].dtype == "int64"
    assert df["text"][0] == "=1+1"  # the caller's frame is not changed


def test_csv_cells_are_neutralised_and_parquet_keeps_raw_values(tmp_path):
    raw = tmp_path / "raw"
    _series(raw / "s1", "formula", **HOSTILE)
    pub = _ingest(raw, tmp_path)
    assert pub["selected"].sum() == 1
    assert pub["manufacturer"].iloc[0] == HOSTILE["manufacturer"]  # in memory: raw

    with open(tmp_path / "inventory" / "series.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["manufacturer"] == "'" + HOSTILE["manufacturer"]
    assert row["description"] == "'" + HOSTILE["description"]
    parquet = pd.read_parquet(tmp_path / "inventory" / "series.parquet")
    assert parquet["manufacturer"].iloc[0] == HOSTILE["manufacturer"]
    assert parquet["description"].iloc[0] == HOSTILE["description"]

    private = tmp_path / "private"
    with open(private / "id_map.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["PatientName"] == "'" + HOSTILE["name"]
    assert row["AccessionNumber"] == "'" + HOSTILE["accession"]
    idmap = pd.read_parquet(private / Path(paths.ID_MAP_PARQUET).name)
    assert idmap["PatientName"].iloc[0] == HOSTILE["name"]
    assert idmap["AccessionNumber"].iloc[0] == HOSTILE["accession"]
    # machine reads of the id map (manifest, explain) get the raw values even given the CSV
    assert io.read_id_map(private / "id_map.csv")["AccessionNumber"].iloc[0] == HOSTILE["accession"]
    for text in (tmp_path / "inventory" / "series.csv", private / "id_map.csv"):
        for cell in csv.reader(open(text, newline="")):
            assert not any(c.startswith(io.FORMULA_START) and not c[1:2].isdigit() for c in cell)


# --------------------------------------------------------------------------- 2. temporaries


def _dead_pid() -> int:
    proc = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(proc.stdout)


def test_orphan_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "table.csv"
    dead = tmp_path / f".table.csv.{io._HOST}.{_dead_pid()}.abc123.part"
    alive = tmp_path / f".table.csv.{io._HOST}.{os.getppid()}.def456.part"
    other_host = tmp_path / f".table.csv.otherhost.{_dead_pid()}.ghi789.part"
    other_target = tmp_path / f".table.csv.x.{io._HOST}.{_dead_pid()}.jkl012.part"
    for p in (dead, alive, other_host, other_target):
        p.write_text("half")
    with io.atomic_path(target) as tmp:
        assert f".{os.getpid()}." in tmp.name  # the writer's pid names its temporary
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    assert not dead.exists()
    assert alive.exists() and other_host.exists() and other_target.exists()


def test_a_killed_writer_leaves_a_temporary_the_next_write_removes(tmp_path):
    target = tmp_path / "big.bin"
    code = (
        "import sys, time\n"
        "from radflow import io\n"
        "with io.atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [PYTHON, "-c", code, str(target)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    left = list(tmp_path.glob(".big.bin.*.part"))
    assert len(left) == 1 and f".{proc.pid}." in left[0].name
    with io.atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("write failed"),  # raised from an ENOSPC below (the chain is searched)
    ],
)
def test_a_full_disk_is_reported_as_enospc_and_leaves_nothing(tmp_path, exc):
    target = tmp_path / "vol.nii.gz"
    with pytest.raises(OSError, match="no space left on device while writing") as err:
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            if isinstance(exc, RuntimeError):
                raise exc from OSError(errno.ENOSPC, "No space left on device")
            raise exc
    assert err.value.errno == errno.ENOSPC and str(target) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_with_no_free_space_is_enospc(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... unexpected pos ...'), no errno."""
    target = tmp_path / "best.pt"
    usage = shutil.disk_usage(tmp_path)
    with pytest.raises(RuntimeError, match="unexpected pos"), io.atomic_path(target):
        raise RuntimeError("[enforce fail at inline_container.cc:603] unexpected pos 64 vs 2")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(OSError, match="no space left on device while writing") as err:
        with io.atomic_path(target):
            raise RuntimeError("[enforce fail at inline_container.cc:603] unexpected pos 64 vs 2")
    assert err.value.errno == errno.ENOSPC
    assert isinstance(err.value.__cause__, RuntimeError)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 3. memory bombs


def test_schema_default_budget_is_the_code_default():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    prop = schema["properties"]["ingest"]["properties"]["max_image_mb"]
    assert prop["default"] == dicomsafe.DEFAULT_MAX_IMAGE_MB
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert cfg["ingest"]["max_image_mb"] == prop["default"]


def _deflate_bomb(path: Path, rows: int = 32768, cols: int = 32768, n: int | None = None) -> None:
    """A deflated CT file of ~2 MB whose pixel data inflates to ``n`` (default rows*cols*2)
    bytes of zeros."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "BOMB"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = rows * cols * 2 if n is None else n
    element = b"\xe0\x7f\x10\x00OW\x00\x00" + n.to_bytes(4, "little")
    # a full flush resets the compressor, so every 16 MiB block of zeros deflates the same
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = c.compress(body.getvalue() + element) + c.flush(zlib.Z_FULL_FLUSH)
    block_size = 16 << 20
    block = c.compress(bytes(block_size)) + c.flush(zlib.Z_FULL_FLUSH)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = dicomsafe.DEFLATED
    fh = stdio.BytesIO()
    fh.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fh, meta)
    with open(path, "wb") as out:
        out.write(fh.getvalue() + head)
        for _ in range(n // block_size):
            out.write(block)
        out.write(c.flush())


def test_deflate_bomb_is_rejected_with_its_claim_and_low_peak_memory(tmp_path):
    raw = tmp_path / "raw"
    (raw / "x").mkdir(parents=True)
    _deflate_bomb(raw / "x" / "bomb.dcm")
    assert (raw / "x" / "bomb.dcm").stat().st_size < 3 << 20
    code = (
        "import sys\n"
        "from radflow import ingest\n"
        "ingest.ingest(sys.argv[1], sys.argv[2] + '/inv', sys.argv[2] + '/priv',\n"
        "    ingest.SelectionRules(), ingest.LabelSpec(), 'salt-0123456789', max_image_mb=1024)\n"
        # VmHWM, not ru_maxrss: Linux carries the forking parent's peak (pytest with torch
        # loaded, ~2 GB) across exec into ru_maxrss, but VmHWM belongs to this process's memory
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) // 1024)\n"
    )
    proc = subprocess.run(
        [PYTHON, "-c", code, str(raw), str(tmp_path)], capture_output=True, text=True, env=ENV
    )
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.split()[-1])
    assert peak_mb < 500, f"ingest peaked at {peak_mb} MB on a 2 MB file"
    rej = pd.read_csv(tmp_path / "inv" / "rejected_files.csv")
    assert rej["error"].tolist() == ["claims 2048 MB of pixel data > ingest.max_image_mb 1024"]
    inv = pd.read_csv(tmp_path / "inv" / "series.csv")
    assert inv["reason_code"].tolist() == ["TOO_LARGE"]
    assert "claims 2048 MB" in inv["reason"].iloc[0]


def test_deflate_stream_longer_than_claimed_is_refused(tmp_path):
    """A header claiming a small image over a huge stream: counted, never kept, refused."""
    path = tmp_path / "liar.dcm"
    _deflate_bomb(path, rows=16, cols=16, n=512 << 20)
    tracemalloc.start()
    head = dicomsafe.read_header(path, max_image_mb=1024)  # within budget: counted, not kept
    assert head.ds.Rows == 16 and head.pixel_bytes_available >= 512 << 20
    with pytest.raises(dicomsafe.HeaderError, match="inflates to more than .* 100"):
        dicomsafe.read_header(path, max_image_mb=100)
    assert tracemalloc.get_traced_memory()[1] < 64 << 20
    tracemalloc.stop()
    over = tmp_path / "over.dcm"
    _deflate_bomb(over, rows=16384, cols=16384)
    head = dicomsafe.read_header(over, max_image_mb=100)  # the claim alone: nothing inflated
    assert head.pixel_bytes_available is None
    assert dicomsafe.claim_error(head.ds, 100) == (
        "claims 512 MB of pixel data > ingest.max_image_mb 100"
    )


def test_small_deflated_series_still_converts(tmp_path):
    raw = tmp_path / "raw"
    for f in _series(raw / "s", "deflated"):
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = dicomsafe.DEFLATED
        ds.save_as(f, enforce_file_format=True)
    pub = _ingest(raw, tmp_path)
    assert pub["reason_code"].tolist() == ["SELECTED"], pub["reason"].tolist()
    case = pub["case_id"].iloc[0]
    sc = convert.convert(
        _file_list(tmp_path, case), tmp_path / "o.nii.gz", convert.ConvertSettings()
    )
    assert sc["acquisition"]["n_instances"] == 22 and sc["geometry"]["shape"][2] == 22


def _claim(files: list[Path], rows: int, cols: int) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Rows, ds.Columns = rows, cols
        ds.save_as(f, enforce_file_format=True)


def test_rle_series_claiming_a_huge_matrix_is_excluded_and_refused(tmp_path):
    raw = tmp_path / "raw"
    files = _series(raw / "rle", "rle-huge", rle=True)
    _claim(files, 16384, 16384)  # 512 MiB per slice, 11 GiB as a volume, from ~1 kB files
    pub = _ingest(raw, tmp_path)
    assert pub["reason_code"].tolist() == ["TOO_LARGE"]
    assert "int16 volume > ingest.max_image_mb 2048" in pub["reason"].iloc[0]
    (tmp_path / "list.json").write_text(json.dumps([str(f) for f in files]))
    tracemalloc.start()
    for budget, what in ((2048, "the series claims"), (256, "instance 1 of 22 claims 512 MB")):
        with pytest.raises(convert.ConversionRefusedError, match=what) as err:
            convert.convert(
                tmp_path / "list.json",
                tmp_path / "o.nii.gz",
                convert.ConvertSettings(),
                max_image_mb=budget,
            )
        assert err.value.code == "TOO_LARGE"
    assert tracemalloc.get_traced_memory()[1] < 32 << 20  # nothing was allocated for pixels
    tracemalloc.stop()
    assert not (tmp_path / "o.nii.gz").exists()


# --------------------------------------------------------------------------- 4. names


def test_odd_file_and_folder_names_work_end_to_end(tmp_path):
    raw = tmp_path / "raw"
    odd_dir = raw / os.fsdecode(b"caf\xe9 ")  # Latin-1 byte and a trailing space
    files = _series(odd_dir, "odd-names")
    renamed = [
        files[0].with_name(os.fsdecode(b"IM\xff1.dcm")),
        files[1].with_name("IM\n2.dcm"),
        files[2].with_name("IM3.dcm "),
    ]
    for src, dst in zip(files, renamed, strict=False):
        src.rename(dst)
    (odd_dir / os.fsdecode(b"notes\xfe.txt")).write_text("not dicom")
    pub = _ingest(raw, tmp_path)
    assert pub["reason_code"].tolist() == ["SELECTED"] and pub["n_instances"].iloc[0] == 22
    listed = json.loads(_file_list(tmp_path, pub["case_id"].iloc[0]).read_text())
    assert {str(p) for p in renamed} <= set(listed) and len(listed) == 22
    rej = pd.read_csv(tmp_path / "inventory" / "rejected_files.csv")
    assert rej["error"].str.startswith("not DICOM").tolist() == [True]
    priv = pd.read_csv(tmp_path / "private" / "rejected_files.csv")
    assert priv["relative_path"].iloc[0].endswith("notes\\xfe.txt")
    sc = convert.convert(
        _file_list(tmp_path, pub["case_id"].iloc[0]),
        tmp_path / "o.nii.gz",
        convert.ConvertSettings(),
    )
    assert sc["acquisition"]["n_instances"] == 22


def test_unreadable_folder_gets_its_own_rejected_row(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    _series(raw / "ok", "readable")
    locked = raw / "locked"
    locked.mkdir()
    (locked / "IM1.dcm").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path="."):  # root reads any folder: deny this one as chmod 000 would
        if os.fspath(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    pub = _ingest(raw, tmp_path)
    assert pub["reason_code"].tolist() == ["SELECTED"]
    rej = pd.read_csv(tmp_path / "inventory" / "rejected_files.csv")
    assert rej["error"].tolist() == ["unreadable folder: PermissionError: Permission denied"]
    priv = pd.read_csv(tmp_path / "private" / "rejected_files.csv")
    assert priv["relative_path"].tolist() == ["locked"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_unreadable_folder_by_mode(tmp_path):
    raw = tmp_path / "raw"
    _series(raw / "ok", "readable-mode")
    locked = raw / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        _ingest(raw, tmp_path)
    finally:
        locked.chmod(0o755)
    rej = pd.read_csv(tmp_path / "inventory" / "rejected_files.csv")
    assert rej["error"].str.startswith("unreadable folder").sum() == 1


def test_duplicate_sop_instances(tmp_path):
    raw = tmp_path / "raw"
    same = _series(raw / "same", "dup-identical")
    shutil.copyfile(same[4], raw / "same" / "copy_of_IM5.dcm")
    differ = _series(raw / "differ", "dup-conflict")
    ds = pydicom.dcmread(differ[4])
    ds.InstanceNumber = 99  # same SOPInstanceUID, other bytes
    ds.save_as(raw / "differ" / "IM5_edited.dcm", enforce_file_format=True)
    pub = _ingest(raw, tmp_path).set_index("n_instances", drop=False)
    by_code = dict(zip(pub["reason_code"], pub.to_dict("records"), strict=True))
    kept = by_code["SELECTED"]
    assert kept["n_instances"] == 22 and "duplicate_files_ignored" in kept["flags"]
    assert by_code["DUPLICATE_SOP_INSTANCE"]["reason"].startswith("1 SOPInstanceUID(s)")
    listed = json.loads(_file_list(tmp_path, kept["case_id"]).read_text())
    assert len(listed) == 22 and len({Path(p).name for p in listed} & {"copy_of_IM5.dcm"}) == 0


@pytest.mark.parametrize("how", ["deleted", "garbage"])
def test_instance_unreadable_at_convert_time_is_refused(tmp_path, how):
    raw = tmp_path / "raw"
    files = _series(raw / "s", f"vanish-{how}")
    pub = _ingest(raw, tmp_path)
    if how == "deleted":
        files[10].unlink()
    else:
        files[10].write_bytes(b"not dicom any more")
    with pytest.raises(convert.ConversionRefusedError, match="instance 11 of 22") as err:
        convert.convert(
            _file_list(tmp_path, pub["case_id"].iloc[0]),
            tmp_path / "o.nii.gz",
            convert.ConvertSettings(),
        )
    assert err.value.code == "UNREADABLE_INSTANCE" and str(raw) not in str(err.value)


# --------------------------------------------------------------------------- 5. no raw paths


@pytest.mark.parametrize("cut", ["pixels", "header"])
def test_no_raw_path_in_convert_or_ingest_logs(tmp_path, cut):
    raw = tmp_path / "raw" / "SMITH^JOHN" / "CT abdomen"
    files = _series(raw, "smith", matrix=64, truncate=None)
    victim = files[7]
    size = victim.stat().st_size
    with open(victim, "r+b") as fh:
        fh.truncate(size - 100 if cut == "pixels" else 200)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([str(f) for f in files], ensure_ascii=True))
    proc = subprocess.run(
        [PYTHON, "-m", "radflow.cli", "convert", str(listing), str(tmp_path / "o.nii.gz")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == convert_refused(), logs
    assert "instance 8 of 22" in logs
    assert "SMITH" not in logs and str(tmp_path) not in logs
    out = tmp_path / "ingest"
    proc = subprocess.run(
        [PYTHON, "-m", "radflow.cli", "ingest", str(tmp_path / "raw"), str(out / "inventory")]
        + ["--private-dir", str(out / "private"), "--salt", SALT],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SMITH" not in proc.stdout + proc.stderr
    for public in (out / "inventory").iterdir():
        assert b"SMITH" not in public.read_bytes(), public.name
    assert "SMITH^JOHN" in (out / "private" / "rejected_files.csv").read_text()


def convert_refused() -> int:
    from radflow.cli import EXIT_REFUSED

    return EXIT_REFUSED


def test_scrub_removes_paths_from_messages():
    p = "/data/raw/SMITH^JOHN/IM1.dcm"
    msg = f"[Errno 13] Permission denied: '{p}' while reading IM1.dcm and \"/other/x y/z\""
    out = dicomsafe.scrub(msg, p)
    assert "SMITH" not in out and "IM1.dcm" not in out and "/other" not in out
    exc = PermissionError(errno.EACCES, "Permission denied", p)
    assert dicomsafe.error_text(exc, p) == "PermissionError: Permission denied"
