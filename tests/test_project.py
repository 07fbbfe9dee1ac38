"""Project hygiene: pinned dependencies, env files in step, config schema, lint of the workflow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from radflow.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _pins() -> dict[str, str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"] + [d for ds in meta["optional-dependencies"].values() for d in ds]
    pins = {}
    for d in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", d.strip())
        assert m, f"dependency not pinned exactly: {d}"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def test_every_dependency_is_pinned():
    assert _pins()["snakemake"] and _pins()["dicom2nifti"]


@pytest.mark.parametrize("env", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.stem)
def test_env_pins_equal_pyproject(env):
    pins = _pins()
    spec = yaml.safe_load(env.read_text())
    deps = spec["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    seen = 0
    for entry in pip:
        if entry.startswith("-e"):
            continue
        name, ver = entry.split("==")
        assert pins.get(name.lower()) == ver, (
            f"{env.name}: {entry} != pyproject {pins.get(name.lower())}"
        )
        seen += 1
    assert seen >= 5


def test_every_rule_file_has_an_env_and_stage_module():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        if smk.stem == "common":
            continue
        assert (REPO / "envs" / f"{smk.stem}.yaml").exists()
        assert (REPO / "src" / "radflow" / f"{smk.stem}.py").exists()


def test_config_validates_and_defaults_fill(tmp_path):
    from snakemake.utils import validate

    schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(cfg, str(schema))
    minimal = {"raw_dir": "x", "ids": {"salt": "0123456789"}}
    validate(minimal, str(schema), set_default=True)
    assert minimal["convert"]["interpolation"] == "linear"
    assert minimal["ingest"]["selection"]["min_slices"] == 20
    bad = {**cfg, "convert": {**cfg["convert"], "interpolation": "nearest"}}
    with pytest.raises(Exception, match="nearest"):
        validate(bad, str(schema))


def test_schema_documents_every_key():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            if sub.get("type") == "object" or "properties" in sub:
                walk(sub, f"{path}.{key}")
            else:
                assert sub.get("description"), f"{path}.{key} has no description"
                # required keys (raw_dir, the secret ids.salt) deliberately have no default
                if key not in node.get("required", []):
                    assert "default" in sub, f"{path}.{key} has no default"

    walk(schema, "")


def test_snakemake_lint_is_clean():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--lint", "-s", str(REPO / "Snakefile"), "-d", str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_cli_has_a_subcommand_per_stage():
    sub = build_parser()._subparsers._group_actions[0].choices
    for stage in ("demo-data", "ingest", "convert", "segment", "mask", "qc-table"):
        assert stage in sub


def test_cli_convert_refusal_is_clear(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("not dicom")
    rc = main(["convert", str(tmp_path / "s"), str(tmp_path / "o.nii.gz")])
    assert rc == 3
    assert "refused [NO_IMAGES]" in capsys.readouterr().err
