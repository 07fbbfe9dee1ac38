"""export: a model bundle as one ONNX file, for serving outside radflow (``radflow[onnx]``).

``export_onnx(bundle, out)`` traces the bundle's network with ``torch.onnx.export`` (the
torch.export-based exporter). The graph takes the network's input -- ``input``, float
(B, C, Z, Y, X): the stored RAS volumes scaled by the bundle's intensity rule, as
``inputs.InputSpec.network_input`` makes it -- and gives ``logits`` and ``probability`` (the
positive class's softmax, as ``model.predict``); the batch size is free. The file's metadata
(``metadata_props``) records the ``model_json_sha256`` of the bundle it came from, so an
exported file is traceable to its bundle, and what a server needs to use it as radflow does:
threshold, channels, intensity rule and window, input grid, class names.

Preprocessing (selection, convert, segment, mask) stays radflow's: the ONNX file is the
network only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from radflow import bundle
from radflow.io import atomic_path

OPSET = 18
INPUT, OUTPUTS = "input", ("logits", "probability")


def _probabilities(net: Any) -> Any:
    """The network with the positive-class probability as a second output."""
    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.net(x)
            return logits, logits.float().softmax(1)[:, 1]

    return Probabilities().eval()


def metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The ONNX file's metadata (strings) from a bundle's model.json."""
    return {
        "radflow_model_json_sha256": meta["model_json_sha256"],
        "radflow_version": str(meta.get("radflow_version")),
        "architecture": meta["architecture"],
        "threshold": repr(float(meta["threshold"])),
        "class_names": json.dumps(meta["class_names"]),
        "inputs": json.dumps(meta["inputs"]),
        "input_grid": json.dumps(meta["input_grid"]),
        "input_layout": "float (B, C, Z, Y, X): stored RAS (C, X, Y, Z) scaled by the intensity "
        "rule (radflow.inputs.InputSpec.network_input)",
    }


def export_onnx(bundle_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, str]:
    """Write a verified bundle's network as ONNX to ``out`` (atomically); returns the
    metadata recorded in it. Needs the ``onnx`` extra (onnx, onnxscript)."""
    try:
        import onnx
        import torch
    except ImportError as exc:  # pragma: no cover - the optional extra
        raise ImportError(f"ONNX export needs pip install 'radflow[onnx]' ({exc})") from None

    net, ck, meta = bundle.load(bundle_dir, "cpu")
    grid = meta["input_grid"].get("shape") or meta["input_grid"]["shapes_seen"][0]
    x = torch.zeros(2, len(ck["channels"]), *reversed([int(n) for n in grid]))
    program = torch.onnx.export(
        _probabilities(net),
        (x,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT],
        output_names=list(OUTPUTS),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    model = program.model_proto
    info = metadata(meta)
    onnx.helper.set_model_props(model, info)
    onnx.checker.check_model(model)
    with atomic_path(out) as tmp:
        onnx.save_model(model, str(tmp))
    return info


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The radflow metadata of an exported ONNX file."""
    import onnx

    model = onnx.load(str(Path(path)), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
