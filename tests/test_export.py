"""ONNX export: dynamic batch, parity with PyTorch in onnxruntime, the export/eval commands."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from dist_cosface.eval import write_bin
from dist_cosface.eval.cli import add_eval_arguments, run_eval_command
from dist_cosface.export import (
    add_export_arguments,
    check_onnx,
    export_onnx,
    run_export_command,
)
from dist_cosface.models import ModelConfig, build_backbone
from tests.eval_sets import png_bytes

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIZE = 32


def trained_like(name: str, seed: int = 0) -> nn.Module:
    """A backbone whose BN statistics come from real activations, so outputs are O(1)."""
    torch.manual_seed(seed)
    model = build_backbone(ModelConfig(name=name, embedding_size=64, input_size=SIZE))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, SIZE, SIZE))
    return model.eval()


def test_mobilefacenet_onnx_parity_and_dynamic_batch(tmp_path):
    import onnx

    model = trained_like("mobilefacenet")
    path = export_onnx(model, tmp_path / "mfn.onnx", SIZE)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    report = check_onnx(model, path, SIZE, batch_sizes=(1, 6))
    assert report["max_abs_output"] > 0.5  # the comparison is on a real signal
    assert report["max_abs_diff"] < 1e-4 and report["passed"]
    # The check really compares: a differently initialised model of the same shape fails.
    other = check_onnx(trained_like("mobilefacenet", seed=1), path, SIZE)
    assert other["max_abs_diff"] > 1e-2 and not other["passed"]


def test_iresnet18_export_command_and_eval_command(tmp_path, capsys):
    model = trained_like("iresnet18")
    loads = []

    def load_backbone(checkpoint: str):
        loads.append(checkpoint)
        return model, SIZE

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    args = parser.parse_args([str(tmp_path), str(tmp_path / "r18.onnx")])
    assert run_export_command(args, load_backbone) == 0
    assert loads == [str(tmp_path)] and '"passed": true' in capsys.readouterr().out
    report = check_onnx(model, tmp_path / "r18.onnx", SIZE, batch_sizes=(2, 7))
    assert report["max_abs_output"] > 0.5 and report["max_abs_diff"] < 1e-4

    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 256, (SIZE, SIZE, 3))) for _ in range(20)]
    write_bin(tmp_path / "tiny.bin", images, [i % 2 == 0 for i in range(10)])
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path), "--target", str(tmp_path / "tiny.bin"), "--out-dir", str(tmp_path / "ev")]
    )
    assert run_eval_command(args, load_backbone) == 0
    assert "tiny: accuracy" in capsys.readouterr().out
    assert (tmp_path / "ev" / "eval.json").is_file() and (
        tmp_path / "ev" / "roc_tiny.png"
    ).is_file()


def test_opset_is_the_one_asked_for_or_refused(tmp_path):
    """17 is converted from the exporter's 18; 13 cannot be (no adapter for some operators):
    refused, and nothing is written, not even a temporary file."""
    from dist_cosface.export import onnx_opset

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()).eval()
    path = export_onnx(model, tmp_path / "m17.onnx", 8, opset=17)
    assert onnx_opset(path) == 17
    assert check_onnx(model, path, 8, batch_sizes=(3,))["passed"]
    with pytest.raises(ValueError, match=r"m13.onnx: the exporter cannot write this model in "):
        export_onnx(model, tmp_path / "m13.onnx", 8, opset=13)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m17.onnx"]
