"""The Triton LMCL kernels (``classifier.kernel: triton``) on CPU through Triton's interpreter.

The interpreter must be selected (``TRITON_INTERPRET=1``) before the kernel module is
imported, so the numerical cases run in subprocesses (tests/triton_interp_cases.py) and in
spawned gloo ranks whose environment carries the flag; this process only checks dispatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_cosface.classifier import ClassifierConfig, ShardedClassifier
from dist_cosface.classifier.triton_loss import use_triton
from dist_cosface.configtools import ConfigError, from_mapping
from tests.classifier_ref import reference_loss_and_grads
from tests.multiproc import run_ranks
from tests.triton_interp_cases import cuda_case, two_rank_case

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
INTERP_ENV = {"TRITON_INTERPRET": "1"}


def _run_cases(group: str) -> None:
    env = {**os.environ, **INTERP_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.triton_interp_cases", group],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{group} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert f"group {group}: ok" in proc.stdout


@pytest.mark.parametrize("group", ["margins", "partial_fc", "half", "row_stats"])
def test_kernels_match_reference_in_interpreter(group):
    _run_cases(group)


@pytest.mark.slow
def test_kernels_wide_and_many_class_shapes_in_interpreter():
    _run_cases("shapes")


def test_dispatch_and_validation():
    cpu = torch.device("cpu")
    assert not use_triton("auto", cpu, torch.float32)  # auto: torch on CPU
    assert not use_triton("torch", cpu, torch.float32)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            use_triton("triton", cpu, torch.float32)
        head = ShardedClassifier(ClassifierConfig(num_classes=10, kernel="triton"), 4, None)
        with pytest.raises(ValueError, match="kernel=triton needs a CUDA device"):
            head(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="kernel"):
        ClassifierConfig(num_classes=10, kernel="cuda")
    check_fp32_follows_the_tf32_setting()
    cfg = from_mapping(ClassifierConfig, {"kernel": "triton"})
    assert ShardedClassifier(cfg, 4, None).cfg.kernel == "triton"
    with pytest.raises((ConfigError, ValueError), match="kernel"):
        from_mapping(ClassifierConfig, {"kernel": "cuda"})


def check_fp32_follows_the_tf32_setting():
    """fp32 embeddings run on TF32 tensor cores: only where PyTorch allows TF32 matmuls."""
    cuda = torch.device("cuda")  # use_triton looks at the device type only
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert not use_triton("auto", cuda, torch.float32)  # auto falls back to torch
        assert use_triton("auto", cuda, torch.bfloat16)
        with pytest.raises(ValueError, match="TF32"):
            use_triton("triton", cuda, torch.float32)
        matmul.allow_tf32 = True
        assert use_triton("triton", cuda, torch.float32)
        assert use_triton("auto", cuda, torch.float32)
    finally:
        matmul.allow_tf32 = before


@pytest.mark.multiproc
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_two_ranks_on_gloo_match_reference(sample_rate):
    results = run_ranks(2, two_rank_case, sample_rate, env=INTERP_ENV, timeout_s=600)
    x, labels, weight = results[0][:3]
    classes = None
    if sample_rate < 1.0:
        classes = torch.tensor(sorted(c for r in results for c in r[7]))
    ref, dx, dw = reference_loss_and_grads(x, weight, labels, "arcface", 8.0, 0.4, classes)
    start = 0
    for rank, (*_, loss, grad_x, grad_w, class_start, _rows) in enumerate(results):
        n = grad_x.shape[0]
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
        # gradient convention of head.py: world_size times the local embeddings' gradient
        torch.testing.assert_close(grad_x.double(), 2 * dx[start : start + n], rtol=1e-4, atol=1e-6)
        shard = dw[class_start : class_start + grad_w.shape[0]]
        torch.testing.assert_close(grad_w.double(), shard, rtol=1e-4, atol=1e-6, msg=f"rank {rank}")
        start += n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin_type", ["softmax", "nsl", "cosface", "arcface"])
def test_cuda_triton_head_matches_reference(dtype, margin_type):
    cuda_case(dtype, margin_type)  # the compiled kernels, full and Partial FC rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_checks_script_skips_gpu_steps_on_cpu(tmp_path):
    """The default run on a machine without CUDA: every GPU step skipped with the reason, the
    summary written to $OUT; a spent time budget skips even the device step."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECKS_")}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_checks.sh")],
        env={**env, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = _summary(tmp_path)
    assert steps["device"] == "ok"
    assert "torch" in (tmp_path / "device.txt").read_text()
    for name in ("triton", "bench2m", "bench10m", "train"):  # the default, in this order
        assert steps[name] == "skipped: no CUDA device"
    for name in ("tests", "dali_cpu", "dali_mixed"):  # opt-in steps
        assert steps[name] == "skipped: not selected"
    assert list(steps)[:5] == ["device", "triton", "bench2m", "bench10m", "train"]
    assert (tmp_path / "summary.txt").read_text().count("\n") == len(steps)
    out = tmp_path / "spent"
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_checks.sh"), str(out)],
        env={**env, "GPU_CHECKS_BUDGET_S": "0"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _summary(out)["device"] == "skipped: out of time budget"


def _summary(out_dir: Path) -> dict[str, str]:
    steps = json.loads((out_dir / "summary.json").read_text())["steps"]
    return {s["step"]: s["status"] for s in steps}
