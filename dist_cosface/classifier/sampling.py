"""Partial FC class sampling: every positive class plus uniform negatives, reproducibly.

The negatives of one forward depend only on ``(seed, step, micro_step, class_start)``, so a
run resumed at step ``t`` (``head.begin_step(t)``) draws exactly what the original run drew.
"""

from __future__ import annotations

import math

import torch

from dist_cosface.seeding import stable_seed


def sampling_seed(seed: int, step: int, micro_step: int, class_start: int) -> int:
    return stable_seed(seed, step, micro_step, class_start)


def sample_rows(
    local_labels: torch.Tensor, num_local: int, sample_rate: float, seed: int
) -> torch.Tensor:
    """Local rows used this step: sorted positives first, then sorted sampled negatives.

    ``local_labels [N]``: every global-batch label minus this rank's ``class_start``; values
    outside ``[0, num_local)`` belong to other ranks. Returns ``max(ceil(rate * K), P)`` rows
    (P: distinct positives here).
    """
    device = local_labels.device
    owned = (local_labels >= 0) & (local_labels < num_local)
    hits = torch.zeros(num_local, dtype=torch.long, device=device)
    hits.index_add_(0, local_labels.clamp(0, num_local - 1), owned.long())
    is_positive = hits > 0
    num_pos = int(is_positive.sum())  # host sync: the sample size depends on it
    num_sample = min(num_local, max(math.ceil(sample_rate * num_local), num_pos))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    score = torch.rand(num_local, generator=gen, device=device)
    score = torch.where(is_positive, torch.full_like(score, 2.0), score)  # rand < 1 < 2
    picked = torch.topk(score, num_sample, sorted=True).indices
    positives = picked[:num_pos].sort().values
    negatives = picked[num_pos:].sort().values
    return torch.cat([positives, negatives])


def columns_of_targets(
    local_labels: torch.Tensor, rows: torch.Tensor | None, num_local: int
) -> torch.Tensor:
    """Column of each sample's class among the used rows; -1 where another rank owns it."""
    owned = (local_labels >= 0) & (local_labels < num_local)
    local = local_labels.clamp(0, num_local - 1)
    if rows is not None:
        col_of_row = torch.full((num_local,), -1, dtype=torch.long, device=rows.device)
        col_of_row[rows] = torch.arange(rows.shape[0], device=rows.device)
        local = col_of_row[local]
    return torch.where(owned, local, torch.full_like(local, -1))
