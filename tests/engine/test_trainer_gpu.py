"""The engine on one CUDA GPU: bf16 and fp16 (loss scaler) training, checkpoint and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dist_cosface.config import load_config
from dist_cosface.distributed import init_distributed
from dist_cosface.engine import train

GPU_RUN = [
    "model.name=mobilefacenet",
    "model.input_size=112",
    "data.image_size=112",
    "model.embedding_size=512",
    "data.batch_size=128",
    "data.synthetic_num_classes=256",
    "data.synthetic_samples_per_class=16",
    "classifier.num_classes=256",
    "metrics.enabled=false",
    "optim.lr=0.1",
    "optim.warmup_steps=5",
    "train.log_every=10",
    "checkpoint.every_steps=20",
    "data.num_workers=0",
]


def gpu_train(out, precision: str, steps: int, device: str = "cuda", extra=()) -> dict:
    cfg = load_config(
        None,
        [
            *GPU_RUN,
            f"train.output_dir={out}",
            f"train.total_steps={steps}",
            f"train.precision={precision}",
            f"dist.device={device}",
            *extra,
        ],
    )
    return train(cfg, init_distributed(cfg.dist))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_training_and_resume(tmp_path, precision):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / precision
    first = gpu_train(out, precision, 40)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    print(precision, "losses", losses, "samples/s", first.samples_per_s)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.7 * losses[0]
    resumed = gpu_train(out, precision, 60)
    assert resumed.resumed_from.endswith("step_40") and resumed.step == 60
    assert math.isfinite(resumed.loss)
