"""One source of truth for defaults: the config schema. Every settings dataclass agrees with it,
and every field of one can be set from config (and nothing else is in its section)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from radflow import (
    convert,
    evaluate,
    explain,
    ingest,
    labels,
    manifest,
    mask,
    plausibility,
    segment,
    source,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

# dataclass -> (schema section path, keys of that section that only the workflow reads:
# scheduling and templates the rules fill in, never a stage's settings)
SECTIONS = {
    ingest.SelectionRules: (("ingest", "selection"), ()),
    convert.ConvertSettings: (("convert",), ("threads",)),
    segment.SegmentSettings: (
        ("segment",),
        ("threads", "batches", "precomputed", "allow_phantom"),
    ),
    mask.MaskSettings: (("mask",), ("threads",)),
    plausibility.QcSettings: (("qc",), ("reference",)),
    manifest.SplitSettings: (("manifest",), ()),
    train.TrainSettings: (("train",), ("threads",)),
    explain.ExplainSettings: (("explain",), ("threads", "splits", "lesion_reference")),
    labels.LabelSpec: (("labels",), ()),
    source.InputSpec: (("input",), ()),
}
# SelectionRules also holds the convert limits that make a series usable
BORROWED = {
    ingest.SelectionRules: {
        "max_missing_slices": ("convert",),
        "gantry_tilt": ("convert",),
        "irregular_spacing": ("convert",),
    }
}


def _section(path):
    node = SCHEMA
    for key in path:
        node = node["properties"][key]
    return node["properties"]


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise AssertionError(f"{f.name} has no default")


@pytest.mark.parametrize("cls", list(SECTIONS), ids=lambda c: c.__name__)
def test_dataclass_defaults_are_the_schema_defaults(cls):
    path, workflow_only = SECTIONS[cls]
    props = _section(path)
    borrowed = BORROWED.get(cls, {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    settable = (set(props) - set(workflow_only)) | set(borrowed)
    assert set(fields) == settable, (
        f"{cls.__name__}: fields not in the schema {sorted(set(fields) - settable)}, "
        f"schema keys without a field {sorted(settable - set(fields))}"
    )
    for name, f in fields.items():
        spec = _section(borrowed[name])[name] if name in borrowed else props[name]
        assert _plain(_default(f)) == spec["default"], (
            f"{cls.__name__}.{name}: dataclass {_default(f)!r} != schema {spec['default']!r}"
        )


def test_every_settings_dataclass_is_checked():
    """A new stage's settings class must be added above (it cannot be forgotten silently)."""
    import radflow

    found = set()
    for mod in (
        convert,
        evaluate,
        explain,
        ingest,
        labels,
        manifest,
        mask,
        plausibility,
        segment,
        source,
        train,
    ):
        for _, obj in inspect.getmembers(mod, dataclasses.is_dataclass):
            if obj.__module__ == mod.__name__ and hasattr(obj, "from_dict"):
                found.add(obj)
    assert found <= set(SECTIONS), sorted(c.__name__ for c in found - set(SECTIONS))
    assert radflow.__version__


def test_evaluate_defaults_are_the_schema_defaults():
    sig = inspect.signature(evaluate.evaluate)
    for key, spec in _section(("evaluate",)).items():
        assert sig.parameters[key].default == spec["default"], key


def test_no_reserved_or_undocumented_keys():
    text = (REPO / "workflow" / "schemas" / "config.schema.yaml").read_text()
    assert "Reserved" not in text


def test_one_device_vocabulary():
    for section in ("segment", "train", "explain"):
        assert _section((section,))["device"]["pattern"] == "^(auto|cpu|cuda|cuda:[0-9]+)$"
