"""LMCL without feature normalization: the CosFace paper's ablation (its Section 4.3).

With raw features ``x`` the logits are ``||x|| * cos(theta_j)`` and the target gets
``||x|| * f(cos(theta_y))`` (``f`` is the margin function), so the feature norm plays the part
of the fixed scale ``s``. This exists to reproduce that ablation (``tools/experiments.py``):
it materializes the ``[B, C]`` logits and uses plain autograd, so it is for one process and
small class counts only. The sharded, chunked path always normalizes features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_cosface.classifier.margins import MarginSpec, target_fn


def unnormalized_feature_loss(
    spec: MarginSpec, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of ``||x|| * [cos, with the margin on the target]``.

    Shapes: ``embeddings [B, D]``, ``weight [C, D]`` (rows normalized here), ``labels [B]``.
    """
    x = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings
    w = weight.to(x.dtype)
    norm = x.norm(dim=1).clamp_min(1e-12)
    cos = (x / norm[:, None]) @ F.normalize(w, dim=1).t()
    target_cos = cos.gather(1, labels[:, None]).squeeze(1)
    margin_shift = target_fn(spec, target_cos) - target_cos  # 0 for nsl
    logits = cos.scatter_add(1, labels[:, None], margin_shift[:, None]) * norm[:, None]
    return F.cross_entropy(logits, labels)
