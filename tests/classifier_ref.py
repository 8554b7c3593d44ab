"""The float64 reference the sharded classifier is held to (shared by the classifier tests).

It builds the full logits with plain autograd in float64 and an independent margin
formulation (ArcFace through acos), so it shares no code with the chunked kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dist_cosface.classifier import ClassifierConfig, ShardedClassifier

MARGINS = ("softmax", "nsl", "cosface", "arcface")


def reference_logits(x, weight, labels, margin_type, scale, margin):
    """Full [N, C] logits with the margin on the target class (float64 in, float64 out)."""
    if margin_type == "softmax":
        return x @ weight.T
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
    c = cos.gather(1, labels[:, None]).squeeze(1)
    if margin_type == "cosface":
        target = c - margin
    elif margin_type == "arcface":
        theta = torch.acos(c)
        target = torch.where(
            theta + margin <= math.pi, torch.cos(theta + margin), c - margin * math.sin(margin)
        )
    else:
        target = c
    is_target = F.one_hot(labels, weight.shape[0]).bool()
    return scale * torch.where(is_target, target[:, None], cos)


def reference_loss_and_grads(x, weight, labels, margin_type, scale, margin, classes=None):
    """Loss and (dx, dW) of the float64 reference; ``classes`` restricts the softmax."""
    x = x.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    w, y = weight, labels
    if classes is not None:
        position = torch.full((weight.shape[0],), -1, dtype=torch.long)
        position[classes] = torch.arange(len(classes))
        w, y = weight[classes], position[labels]
        if (y < 0).any():
            raise AssertionError("a positive class is missing from the sampled classes")
    loss = F.cross_entropy(reference_logits(x, w, y, margin_type, scale, margin), y)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


def make_head(num_classes, dim, weight, group=None, **cfg):
    """A head over ``group`` whose local rows are this rank's slice of the full ``weight``;
    ``cfg``: the other ``ClassifierConfig`` fields."""
    head = ShardedClassifier(ClassifierConfig(num_classes=num_classes, **cfg), dim, group)
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start : head.class_start + head.num_local_classes])
    return head
