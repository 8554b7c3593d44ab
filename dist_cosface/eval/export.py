"""ONNX export of a backbone with a dynamic batch axis, and a parity check in onnxruntime."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


def export_onnx(backbone: nn.Module, path: str | Path, image_size: int, opset: int = 18) -> Path:
    """Write ``backbone`` (eval mode, on CPU) as one ONNX file: ``images [N, 3, S, S] ->
    embeddings [N, D]`` with N dynamic. Uses the torch.export-based exporter (torch >= 2.5)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export a CPU copy in eval mode so the caller's module (device, train flag) is untouched.
    model = copy.deepcopy(backbone).cpu().eval()
    # Batch 2 in the example: torch.export specialises dimensions of size 0/1 to constants.
    example = torch.zeros(2, 3, image_size, image_size)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        external_data=False,  # a single self-contained file (backbones are far below 2 GB)
        verbose=False,
    )
    return path


def check_onnx(
    backbone: nn.Module,
    path: str | Path,
    image_size: int,
    batch_sizes: tuple[int, ...] = (1, 5),
    atol: float = 1e-4,
    seed: int = 0,
) -> dict:
    """Compare onnxruntime with PyTorch on random inputs of each batch size.

    Returns ``max_abs_diff`` (over all batch sizes), ``max_abs_output`` for scale, and
    ``passed`` (``max_abs_diff <= atol``).
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"{path}: invalid ONNX model: {exc}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = copy.deepcopy(backbone).cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    max_diff, max_out = 0.0, 0.0
    for batch in batch_sizes:
        x = torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise ValueError(f"{path}: ONNX output shape {got.shape} != {expected.shape}")
        max_diff = max(max_diff, float(abs(got - expected).max()))
        max_out = max(max_out, float(abs(expected).max()))
    return {
        "max_abs_diff": max_diff,
        "max_abs_output": max_out,
        "batch_sizes": list(batch_sizes),
        "atol": atol,
        "passed": max_diff <= atol,
    }
