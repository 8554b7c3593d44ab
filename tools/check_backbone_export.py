"""ONNX export + onnxruntime parity for backbones too large for the CI tests.

For each ``--models`` name: build the backbone at 112x112 (512-d), give its BatchNorms
statistics of a random batch (so outputs are O(1) and an absolute tolerance means
something), write it with ``dist_cosface.export.export_onnx`` and compare onnxruntime
with PyTorch on random inputs of batch 1 and 3 (``check_onnx``). One JSON line per model:
export seconds, file size, ``max_abs_diff``, ``max_abs_output``, ``passed`` (at ``--atol``).
A trained checkpoint goes through the same functions with ``dist-cosface export``.

  PYTHONPATH=. python tools/check_backbone_export.py [--models vit_s vit_b vit_l iresnet200]
      [--out DIR] [--atol 1e-4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dist_cosface.export import check_onnx, export_onnx
from dist_cosface.models import ModelConfig, build_backbone

SIZE = 112


def calibrated(name: str, batch: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name=name, input_size=SIZE))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # one batch sets the running statistics exactly
    with torch.no_grad():
        model.train()(torch.rand(batch, 3, SIZE, SIZE) * 2 - 1)
    return model.eval()


def check(name: str, out_dir: Path, atol: float) -> dict:
    model = calibrated(name)
    t0 = time.perf_counter()
    path = export_onnx(model, out_dir / f"{name}.onnx", SIZE)
    export_s = time.perf_counter() - t0
    report = check_onnx(model, path, SIZE, batch_sizes=(1, 3), atol=atol)
    size_mb = path.stat().st_size / 1e6
    path.unlink()  # hundreds of MB each
    return {"model": name, "export_s": round(export_s, 1), "onnx_mb": round(size_mb), **report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_s", "vit_b", "vit_l", "iresnet200"])
    parser.add_argument("--out", default=None, help="folder for the .onnx files (default: temp)")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for name in args.models:
            result = check(name, Path(tmp), args.atol)
            failed += not result["passed"]
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
