"""radflow: raw CT (DICOM) in, an explained 3D classifier out.

The public API for downstream models, importable from the top::

    from radflow import read_manifest, CaseDataset

    cases = read_manifest("manifests/cases.parquet")    # schema-checked DataFrame
    train = CaseDataset("manifests/cases.parquet", split="train", channels=("image", "roi"))

    model = load_model("results/model")                 # a verified bundle, loaded once
    result = model.predict("new_study/")                # probability, prediction, CAM

Each workflow stage is a module with one entry point of its name (``radflow.convert.convert``,
``radflow.segment.segment``, ``radflow.mask.mask``, ...); the output layout is
``radflow.paths``. Names are imported on first use, so ``import radflow`` stays light.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("radflow")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

_API = {
    "read_manifest": ("radflow.manifest", "read"),
    "CaseDataset": ("radflow.data", "CaseDataset"),
    "paths": ("radflow.paths", None),
    "load_model": ("radflow.predict", "load_model"),
}
__all__ = ["CaseDataset", "__version__", "load_model", "paths", "read_manifest"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'radflow' has no attribute {name!r}")
    module, attr = _API[name]
    mod = import_module(module)
    return mod if attr is None else getattr(mod, attr)
