"""ONNX export of a backbone with a dynamic batch axis, a parity check in onnxruntime, and
``dist-cosface export`` (the caller supplies how to load a trained backbone)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from dist_cosface.cliargs import LoadBackbone, existing_path, float_in, int_in, output_file

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
# the exporter's messages: INFO lines per graph pass, and a failed opset conversion logged as
# a warning with a traceback; the opset actually written is checked here instead
_EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")

log = logging.getLogger(__name__)


def export_onnx(backbone: nn.Module, path: str | Path, image_size: int, opset: int = 18) -> Path:
    """Write ``backbone`` (eval mode, on CPU) as one ONNX file: ``images [N, 3, S, S] ->
    embeddings [N, D]`` with N dynamic. Uses the torch.export-based exporter (torch >= 2.5).

    That exporter builds opset 18 graphs and converts them to another ``opset`` where it can
    (17 and 19..: yes; 13: no, no adapter for some operators). The file is written under a
    temporary name and published only if its opset is ``opset``; otherwise ValueError and
    nothing is written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give the path of the .onnx file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export a CPU copy in eval mode so the caller's module (device, train flag) is untouched.
    model = copy.deepcopy(backbone).cpu().eval()
    # Batch 2 in the example: torch.export specialises dimensions of size 0/1 to constants.
    example = torch.zeros(2, 3, image_size, image_size)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _quiet_exporter():
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                external_data=False,  # one self-contained file (backbones are far below 2 GB)
                verbose=False,
            )
        written = onnx_opset(tmp)
        if written != opset:
            raise ValueError(
                f"{path}: the exporter cannot write this model in ONNX opset {opset} (it built "
                f"opset {written} and could not convert it); nothing written: opset {written} "
                "is the exporter's own"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def onnx_opset(path: str | Path) -> int:
    """The default-domain (``ai.onnx``) opset version an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ValueError(f"{path}: declares no ai.onnx opset")
    return versions[0]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's logging and warnings hidden, unless this package logs at DEBUG."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=existing_path, help="checkpoint folder or run directory")
    parser.add_argument("out", type=output_file, help="path of the .onnx file to write")
    parser.add_argument(
        "--opset",
        type=int_in(1),
        default=18,
        help="ONNX opset to write; one the exporter cannot produce is refused (nothing written)",
    )
    parser.add_argument(
        "--atol", type=float_in(0, math.inf), default=1e-4, help="parity tolerance vs PyTorch"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")


def run_export_command(args: argparse.Namespace, load_backbone: LoadBackbone) -> int:
    """Export, then check parity with onnxruntime; returns 1 if the check fails."""
    backbone, image_size = load_backbone(args.checkpoint)
    path = export_onnx(backbone, args.out, image_size, opset=args.opset)
    print(f"wrote {path} (input images [N, 3, {image_size}, {image_size}])")
    if args.no_check:
        return 0
    report = check_onnx(backbone, path, image_size, atol=args.atol)
    print(json.dumps(report))
    return 0 if report["passed"] else 1
