"""The tiny training setup shared by engine, checkpoint and launch tests."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_cosface.config import RunConfig, load_config
from dist_cosface.engine.builders import seed_everything

# mobilefacenet at 32 px, 16-d embeddings, 8 synthetic identities, no exporter
TINY_OVERRIDES = [
    "model.name=mobilefacenet",
    "model.input_size=32",
    "model.embedding_size=16",
    "data.image_size=32",
    "data.batch_size=4",
    "data.synthetic_num_classes=8",
    "data.synthetic_samples_per_class=8",
    "classifier.num_classes=8",
    "classifier.scale=16.0",
    "metrics.enabled=false",
    "train.log_every=1",
]


def tiny_config(out: Path | str, *overrides: str) -> RunConfig:
    """mobilefacenet at 32 px, 16-d embeddings, 8 synthetic identities, no exporter."""
    base = [
        *TINY_OVERRIDES,
        "classifier.margin=0.2",
        "optim.lr=0.05",
        "optim.warmup_steps=1",
        "train.total_steps=3",
        "checkpoint.every_steps=0",
        f"train.output_dir={out}",
    ]
    return load_config(None, base + list(overrides))


class FixedLoader:
    """A deterministic list of batches per epoch with the TrainLoader interface."""

    failure = None  # never meets bad data

    def __init__(self, batches, num_classes):
        self.batches, self.num_classes, self.stats = batches, num_classes, {}
        self.epoch, self.position = 0, 0

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches_consumed": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["batches_consumed"]

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]


def linear_backbone(cfg):
    """Flatten + Linear to 16-d, seeded by ``train.seed``."""
    # no batch statistics: a batch of 2B and two micro-batches of B must give the same step
    seed_everything(cfg.train.seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16))


def fixed_batches(n, batch, seed=0):
    """``n`` seeded batches of 32 px images and labels in [0, 8)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1,
            torch.randint(0, 8, (batch,), generator=gen),
        )
        for _ in range(n)
    ]


# DeepSpeed vs DDP comparisons (tests/engine/test_trainer_deepspeed.py, tools/ds_rounding_check.py):
# accumulation 2 (DeepSpeed scales the loss itself), SGD momentum + weight decay, no clipping
# (with DeepSpeed the backbone is clipped by DeepSpeed on its own norm, docs/training.md)
DS_COMPARE_OVERRIDES = (
    "optim.grad_accum_steps=2",
    "optim.grad_clip=null",
    "optim.weight_decay=0.01",
    "optim.lr=0.02",
    "classifier.scale=8.0",
)
