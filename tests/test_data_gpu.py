"""DALI with GPU decoding (``mixed``): same images and labels as CPU decoding, on the GPU."""

from __future__ import annotations

import pytest
import torch

from dist_cosface.data import DataConfig, build_loader
from dist_cosface.distributed import DistContext

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dali_mixed_matches_cpu(tmp_path, dtype):
    pytest.importorskip("nvidia.dali")
    from dist_cosface.data.synth_shards import write_synthetic_shards

    write_synthetic_shards(tmp_path, 256, num_classes=10, shard_size=64)
    kw = dict(
        backend="dali",
        path=str(tmp_path),
        batch_size=32,
        random_flip=False,
        output_dtype=dtype,
        num_workers=4,
    )
    gpu_ctx = DistContext(device=torch.device("cuda", 0))
    on_gpu = build_loader(DataConfig(dali_device="mixed", **kw), gpu_ctx)
    on_cpu = build_loader(DataConfig(dali_device="cpu", **kw), DistContext())
    assert len(on_gpu) == len(on_cpu) == 8
    for (gx, gy), (cx, cy) in zip(on_gpu, on_cpu):
        assert gx.is_cuda and gy.is_cuda and gx.dtype == getattr(torch, dtype)
        assert gx.shape == (32, 3, 112, 112) and torch.equal(gy.cpu(), cy)
        # nvJPEG and libjpeg-turbo may differ by an IDCT rounding step
        assert float((gx.float().cpu() - cx.float()).abs().mean()) < 0.02
