"""Each training sample against its class center, on the rank that owns the class.

Embeddings travel to the owner of their label in one all-to-all per round (rounds bound the
memory in flight); the owner scores them against the class's K sub-centers, counts which
sub-center each sample is nearest to, takes the class's dominant sub-center (the one nearest
to most of its samples; ties: the lower one) and scores every sample against it. With K = 1
the dominant sub-center is the class center and its share is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_cosface.clean.centers import Centers
from dist_cosface.clean.comm import all_reduce_, exchange_rows
from dist_cosface.clean.embed import Embedded

ROUTE_ROWS = 65536  # samples a rank sends per all-to-all round


@dataclass
class OwnerScores:
    """The samples of this rank's classes and the classes' sub-center statistics."""

    indices: torch.Tensor  # [n] global sample index
    labels: torch.Tensor  # [n] class
    cos: torch.Tensor  # [n] float64 cosine with the class's dominant sub-center
    class_counts: torch.Tensor  # [local classes] samples per class
    dominant: torch.Tensor  # [local classes] dominant sub-center
    share: torch.Tensor  # [local classes] float64 share of the dominant one (NaN: no samples)

    @property
    def angles(self) -> torch.Tensor:
        """Degrees between each sample and its dominant sub-center."""
        return torch.rad2deg(torch.arccos(self.cos.clamp(-1.0, 1.0)))


def score_samples(
    embedded: Embedded, centers: Centers, group: dist.ProcessGroup | None
) -> OwnerScores:
    """Collective: the scores of every sample of this rank's classes (see module doc)."""
    world = 1 if group is None else dist.get_world_size(group)
    owners = centers.owners(embedded.labels)
    order = torch.argsort(owners, stable=True)
    rounds = torch.tensor([math.ceil(len(order) / ROUTE_ROWS)], dtype=torch.int64)
    all_reduce_(rounds, group, dist.ReduceOp.MAX)  # every rank takes part in every round
    indices, labels, cos = [], [], []
    for r in range(int(rounds.item())):
        part = order[r * ROUTE_ROWS : (r + 1) * ROUTE_ROWS]
        counts = torch.bincount(owners[part], minlength=world).tolist()
        ids = torch.stack([embedded.indices[part], embedded.labels[part]], dim=1)
        got_ids = exchange_rows(ids, counts, group)
        got_emb = exchange_rows(embedded.embeddings[part], counts, group)
        rows = centers.rows[got_ids[:, 1] - centers.class_start].double()  # [m, K, D]
        cos.append(torch.einsum("md,mkd->mk", got_emb.double(), rows))
        indices.append(got_ids[:, 0])
        labels.append(got_ids[:, 1])
    k = centers.num_subcenters
    all_cos = torch.cat(cos) if cos else torch.zeros(0, k, dtype=torch.float64)
    return _dominant_scores(
        torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64),
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
        all_cos,
        centers,
    )


def _dominant_scores(
    indices: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor, centers: Centers
) -> OwnerScores:
    # a fixed order whatever the route: by global sample index
    order = torch.argsort(indices)
    indices, labels, cos = indices[order], labels[order], cos[order]
    n_local, k = centers.num_local, centers.num_subcenters
    local = labels - centers.class_start
    nearest = torch.argmax(cos, dim=1) if len(cos) else torch.zeros(0, dtype=torch.int64)
    votes = torch.zeros(n_local * k, dtype=torch.int64)
    votes.index_add_(0, local * k + nearest, torch.ones_like(local))
    votes = votes.view(n_local, k)
    dominant = torch.argmax(votes, dim=1) if n_local else torch.zeros(0, dtype=torch.int64)
    totals = votes.sum(dim=1)
    top = votes.gather(1, dominant.unsqueeze(1)).squeeze(1) if n_local else totals
    share = torch.where(totals > 0, top.double() / totals.clamp(min=1), float("nan"))
    score = cos.gather(1, dominant[local].unsqueeze(1)).squeeze(1) if len(cos) else cos[:, 0]
    return OwnerScores(indices, labels, score, totals, dominant, share)
