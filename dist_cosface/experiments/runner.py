"""One experiment: train a backbone + the project's ``ShardedClassifier`` on the training
identities, then verify on held-out identities (open set) with 10-fold accuracy and TAR@FAR.

World size 1, in-process: the head under test is the project's own (every margin type, sub-
centers, ``scale="auto"`` from the CosFace bound, row optimizer). ``label_noise`` flips a
fraction of the training labels to another identity (the same flips for every configuration of
a seed), for the noise-robustness comparison of sub-center heads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dist_cosface.classifier import (
    ClassifierConfig,
    ShardedClassifier,
    build_classifier_optimizer,
)
from dist_cosface.classifier.margins import (
    AdaFaceParams,
    CombinedParams,
    CurricularFaceParams,
    MagFaceParams,
    MarginType,
)
from dist_cosface.engine.config import OptimConfig
from dist_cosface.engine.lr_schedule import lr_at, set_lr
from dist_cosface.eval.roc import verification_metrics
from dist_cosface.experiments.faces import FaceSet, identity_split, load_faces, make_pairs
from dist_cosface.experiments.smallnet import SmallFaceNet
from dist_cosface.imageio import to_unit_range
from dist_cosface.models import ModelConfig, build_backbone
from dist_cosface.seeding import stable_seed

FARS = (1e-2, 1e-3)
_NOISE_STREAM = 7  # label-noise draws: their own stream of the run's seed


@dataclass
class ExperimentConfig:
    dataset: Literal["orl", "yaleb"] = "yaleb"
    data_root: str = "../shared/data"  # relative to the repository root
    split: Literal["test", "val"] = "test"  # "val": tune on training identities only
    backbone: Literal["small", "mobilefacenet", "iresnet18"] = "small"
    image_size: int = 32
    width: int = 16  # channels of the small net's first stage
    dropout: float = 0.2  # before the embedding layer of the small net
    augment: bool = True  # random flip / shift / zoom of training images
    embedding_size: int = 64
    margin_type: MarginType = "cosface"
    margin: float = 0.35
    # the head's margin sections and sub-centers (ClassifierConfig's keys, same meaning)
    combined: CombinedParams = field(default_factory=CombinedParams)
    curricularface: CurricularFaceParams = field(default_factory=CurricularFaceParams)
    adaface: AdaFaceParams = field(default_factory=AdaFaceParams)
    magface: MagFaceParams = field(default_factory=MagFaceParams)
    subcenters: int = 1
    label_noise: float = 0.0  # share of training labels flipped to another identity
    scale: Union[float, Literal["auto"]] = 30.0
    scale_p_w: float = 0.9
    feature_norm: bool = True  # False: logit ||x|| (cos - m), needs the head's option
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    max_identities: Union[int, None] = None  # tests: keep the first N train / eval identities
    max_per_identity: Union[int, None] = None
    max_pairs: int = 6000

    def __post_init__(self) -> None:
        for key in ("image_size", "embedding_size", "epochs", "batch_size", "max_pairs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.scale != "auto" and self.scale <= 0:
            raise ValueError(f"scale must be positive or 'auto', got {self.scale}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")


_CACHE: dict[tuple[str, int], FaceSet] = {}


def cached_faces(root: Path, size: int) -> FaceSet:
    """Decode a face folder once per process; later configurations reuse the tensor."""
    key = (str(root.resolve()), size)
    if key not in _CACHE:
        _CACHE[key] = load_faces(root, size)
    return _CACHE[key]


def split_sets(cfg: ExperimentConfig, repo_root: Path) -> tuple[FaceSet, FaceSet]:
    faces = cached_faces(repo_root / cfg.data_root / cfg.dataset, cfg.image_size)
    train_ids, eval_ids = identity_split(faces.identities, cfg.split)
    if cfg.max_identities is not None:
        train_ids, eval_ids = train_ids[: cfg.max_identities], eval_ids[: cfg.max_identities]
    return (
        faces.subset(train_ids, cfg.max_per_identity),
        faces.subset(eval_ids, cfg.max_per_identity),
    )


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey ``[B, 1, S, S]`` -> float ``[B, 3, S, S]`` in [-1, 1] (backbones want RGB)."""
    return to_unit_range(images).expand(-1, 3, -1, -1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, +-10% shift and +-10% zoom, per sample, in one resampling."""
    b = x.shape[0]
    zoom = 1.0 + (torch.rand(b, generator=gen) - 0.5) * 0.2
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.2
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = zoom * flip, zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def build_model(cfg: ExperimentConfig) -> nn.Module:
    if cfg.backbone == "small":
        return SmallFaceNet(cfg.embedding_size, cfg.image_size, cfg.width, cfg.dropout)
    return build_backbone(
        ModelConfig(name=cfg.backbone, embedding_size=cfg.embedding_size, input_size=cfg.image_size)
    )


def build_head(cfg: ExperimentConfig, num_classes: int) -> ShardedClassifier:
    head_cfg = ClassifierConfig(
        num_classes=num_classes,
        margin_type=cfg.margin_type,
        scale=cfg.scale,
        margin=cfg.margin,
        combined=cfg.combined,
        curricularface=cfg.curricularface,
        adaface=cfg.adaface,
        magface=cfg.magface,
        subcenters=cfg.subcenters,
        scale_p_w=cfg.scale_p_w,
        feature_norm=cfg.feature_norm,
    )
    return ShardedClassifier(head_cfg, cfg.embedding_size, None)  # one process, no group


def flip_labels(labels: torch.Tensor, num_classes: int, share: float, seed: int) -> torch.Tensor:
    """``labels`` with ``round(share * N)`` of them (drawn from ``seed``) replaced by another
    identity, uniformly: the symmetric label noise of the Sub-center ArcFace experiments."""
    if share == 0.0:
        return labels
    gen = torch.Generator().manual_seed(stable_seed(seed, _NOISE_STREAM))
    flipped = torch.randperm(len(labels), generator=gen)[: round(share * len(labels))]
    shift = torch.randint(1, num_classes, (len(flipped),), generator=gen)  # never the same id
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy


def train_model(cfg: ExperimentConfig, train: FaceSet) -> tuple[nn.Module, ShardedClassifier, dict]:
    """Train backbone + head with AdamW and the engine's cosine schedule (``lr_at``);
    returns both and a summary."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg)
    head = build_head(cfg, len(train.identities))
    head.reset_parameters(seed=cfg.seed)
    opt_model = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_head = build_classifier_optimizer(head, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    labels = flip_labels(train.labels, len(train.identities), cfg.label_noise, cfg.seed)
    n = len(labels)
    steps_per_epoch = max(n // cfg.batch_size, 1)  # drop the ragged tail (BatchNorm)
    total = steps_per_epoch * cfg.epochs
    # the engine's schedule, so experiments and training runs decay the same way
    schedule = OptimConfig(name="adamw", lr=cfg.lr, schedule="cosine", warmup_steps=0, min_lr=0.0)
    losses, step = [], 0
    model.train()
    head.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for k in range(steps_per_epoch):
            idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            set_lr((opt_model, opt_head), lr_at(schedule, step, total))
            x = to_input(train.images[idx])
            if cfg.augment:
                x = augment(x, gen)
            loss = head(model(x), labels[idx])
            opt_model.zero_grad(set_to_none=True)
            opt_head.zero_grad(set_to_none=True)
            loss.backward()
            opt_model.step()
            opt_head.step()
            losses.append(float(loss.detach()))
            step += 1
    if not math.isfinite(losses[-1]):
        raise ValueError(f"training diverged for {cfg}: final loss {losses[-1]}")
    return model, head, {"steps": total, "final_loss": float(np.mean(losses[-steps_per_epoch:]))}


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Embeddings of the image and its mirror, summed (the usual flip test-time trick)."""
    model.eval()
    out = []
    for k in range(0, len(images), batch):
        x = to_input(images[k : k + batch])
        out.append(model(x) + model(x.flip(3)))
    return torch.cat(out)


def verify(features: torch.Tensor, labels: torch.Tensor, max_pairs: int) -> dict:
    """The evaluator's figures (``verification_metrics``, 10 folds) as one flat result row."""
    pairs, issame = make_pairs(labels, max_pairs, seed=0)  # same pairs for every run
    f = F.normalize(features.double(), dim=1)
    scores = (f[pairs[:, 0]] * f[pairs[:, 1]]).sum(1).numpy()
    metrics = verification_metrics(scores, issame, list(FARS), n_folds=10)
    tars = metrics.pop("tar_at_far")
    metrics.pop("fold_accuracies")
    negatives = int((~issame).sum())
    row = {k: metrics.pop(k) for k in ("accuracy", "accuracy_std", "best_threshold")}
    for far in FARS:
        # TAR at a FAR below 1/negatives would be decided by a single pair: not reported
        row[f"tar_at_far_{far:g}"] = tars[far] if far * negatives >= 1 else None
    row.update(metrics)  # roc_auc, num_pairs
    return row


def run_experiment(cfg: ExperimentConfig, repo_root: str | Path = ".") -> dict:
    """Train on the training identities, verify on the held-out ones; one result row."""
    start = time.perf_counter()
    train, held = split_sets(cfg, Path(repo_root))
    model, head, summary = train_model(cfg, train)
    result = verify(embed(model, held.images), held.labels, cfg.max_pairs)
    result.update(summary)
    result.update(
        scale=head.scale,
        num_train_identities=len(train.identities),
        num_train_images=len(train.labels),
        num_eval_identities=len(held.identities),
        seconds=time.perf_counter() - start,
    )
    return result
