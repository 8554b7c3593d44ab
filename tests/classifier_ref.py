"""The float64 reference the sharded classifier is held to (shared by the classifier tests).

It builds the full logits with plain autograd in float64, from the papers' formulas with
independent formulations (angles through ``acos``, sub-centers as an explicit max over a
``[N, C, K]`` tensor, running statistics as Python floats), so it shares no code with the
chunked kernel.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dist_cosface.classifier import ClassifierConfig, ShardedClassifier

MARGINS = ("softmax", "nsl", "cosface", "arcface")
NEW_MARGINS = ("combined", "curricularface", "adaface", "magface")
ALL_MARGINS = MARGINS + NEW_MARGINS


def _arcface_target(c: torch.Tensor, m) -> torch.Tensor:
    """ArcFace (Deng et al. 2019): cos(theta + m), and insightface's c - m sin(m) beyond pi."""
    theta = torch.acos(c.clamp(-1.0, 1.0))
    m = torch.as_tensor(m, dtype=c.dtype)
    return torch.where(theta + m <= math.pi, torch.cos(theta + m), c - m * torch.sin(m))


@dataclass
class ReferenceHead:
    """A dense float64 margin head; running statistics are plain floats it updates itself.

    ``combined = (m1, m2, m3)``; ``magface = (l_a, u_a, l_m, u_m, lambda_g)``.
    """

    margin_type: str
    scale: float
    margin: float
    subcenters: int = 1
    combined: tuple[float, float, float] = (1.0, 0.5, 0.0)
    straight_through: bool = False
    curricular_momentum: float = 0.01
    adaface_h: float = 0.333
    adaface_momentum: float = 0.01
    magface: tuple[float, float, float, float, float] = (10.0, 110.0, 0.45, 0.8, 35.0)
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.margin_type == "curricularface":
            self.stats = {"t": 0.0}
        elif self.margin_type == "adaface":
            self.stats = {"norm_mean": 20.0, "norm_std": 100.0}

    def loss_and_grads(self, x, weight, labels, classes=None, train=True):
        """Loss and (dx, dW) on raw embeddings ``x [N, D]`` and rows ``weight [C * K, D]``;
        ``classes`` restricts the softmax (Partial FC); ``train`` updates the statistics."""
        x = x.detach().double().requires_grad_()
        weight = weight.detach().double().requires_grad_()
        logits, y, extra = self.logits(x, weight, labels, classes, train)
        loss = F.cross_entropy(logits, y) + extra
        loss.backward()
        return loss.detach(), x.grad, weight.grad

    def logits(self, x, weight, labels, classes, train):
        """(logits [N, C'], targets [N], regulariser) with the margin on the target class."""
        k = self.subcenters
        if self.margin_type == "softmax":
            cos = (x @ weight.T).view(len(x), -1, k).amax(dim=2)
        else:
            xn = x / x.norm(dim=1, keepdim=True)
            wn = weight / weight.norm(dim=1, keepdim=True)
            # sub-center (Deng et al. 2020): a class's cosine is the max over its K centers
            cos = torch.max((xn @ wn.T).view(len(x), -1, k), dim=2).values
        y = labels
        if classes is not None:
            position = torch.full((cos.shape[1],), -1, dtype=torch.long)
            position[classes] = torch.arange(len(classes))
            cos, y = cos[:, classes], position[labels]
            if (y < 0).any():
                raise AssertionError("a positive class is missing from the sampled classes")
        rows = torch.arange(len(y))
        c = cos[rows, y]
        norms = x.norm(dim=1)
        target, negatives, extra = self._target(c, cos, norms, train)
        if self.straight_through:  # arcface_torch's no_grad margin: gradient as for f(c) = c
            target = c + (target - c).detach()
        is_target = F.one_hot(y, cos.shape[1]).bool()
        scale = 1.0 if self.margin_type == "softmax" else self.scale
        return scale * torch.where(is_target, target[:, None], negatives), y, extra

    def _target(self, c, cos, norms, train):
        kind, m = self.margin_type, self.margin
        zero = torch.zeros((), dtype=c.dtype)
        if kind in ("softmax", "nsl"):
            return c, cos, zero
        if kind == "cosface":
            return c - m, cos, zero
        if kind == "arcface":
            return _arcface_target(c, m), cos, zero
        if kind == "combined":
            m1, m2, m3 = self.combined
            theta = torch.acos(c.clamp(-1.0, 1.0))
            # beyond theta* = (pi - m2) / m1: the linear continuation, continuous at theta*
            theta_star = min((math.pi - m2) / m1, math.pi)
            tail = c - math.cos(theta_star) + math.cos(m1 * theta_star + m2)
            return (
                torch.where(theta <= theta_star, torch.cos(m1 * theta + m2), tail) - m3,
                cos,
                zero,
            )
        if kind == "curricularface":
            return self._curricular(c, cos, train)
        if kind == "adaface":
            return self._adaface(c, norms, train), cos, zero
        if kind == "magface":
            target, regulariser = self._magface(c, norms)
            return target, cos, regulariser
        raise ValueError(kind)

    def _curricular(self, c, cos, train):
        """CurricularFace (Huang et al. 2020): hard negatives cos_j > cos(theta_y + m) become
        cos_j (t + cos_j); t <- 0.01 mean(cos_y) + 0.99 t before use."""
        m = self.margin
        if train:
            mom = self.curricular_momentum
            self.stats["t"] = mom * float(c.detach().mean()) + (1 - mom) * self.stats["t"]
        t = self.stats["t"]
        bar = torch.cos(torch.acos(c.detach().clamp(-1.0, 1.0)) + m)[:, None]
        negatives = torch.where(cos > bar, cos * (t + cos), cos)
        return _arcface_target(c, m), negatives, torch.zeros((), dtype=c.dtype)

    def _adaface(self, c, norms, train):
        """AdaFace (Kim et al. 2022): margins from the detached feature norm, normalized by
        running batch mean / std; g_angle = -m z, g_add = m + m z, z = clip(h (a - mu) /
        (sigma + eps), -1, 1)."""
        eps, m = 1e-3, self.margin
        a = norms.detach().clamp(1e-3, 100.0)
        if train:
            mom = self.adaface_momentum
            std = float(a.std()) if len(a) > 1 else 0.0
            self.stats["norm_mean"] = mom * float(a.mean()) + (1 - mom) * self.stats["norm_mean"]
            self.stats["norm_std"] = mom * std + (1 - mom) * self.stats["norm_std"]
        z = ((a - self.stats["norm_mean"]) / (self.stats["norm_std"] + eps) * self.adaface_h).clamp(
            -1.0, 1.0
        )
        theta = torch.acos(c.clamp(-1 + eps, 1 - eps))
        theta_m = (theta - m * z).clamp(eps, math.pi - eps)
        return torch.cos(theta_m) - (m + m * z)

    def _magface(self, c, norms):
        """MagFace (Meng et al. 2021): ArcFace with m(a) linear on [l_a, u_a] -> [l_m, u_m],
        plus lambda_g g(a), g(a) = a / u_a^2 + 1 / a, both through the feature norm a."""
        l_a, u_a, l_m, u_m, lam = self.magface
        a = norms.clamp(l_a, u_a)
        m = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)
        theta = torch.acos(c.clamp(-1.0, 1.0))
        target = torch.where(theta + m <= math.pi, torch.cos(theta + m), c - m * torch.sin(m))
        return target, lam * (a / u_a**2 + 1.0 / a).mean()


def reference_head(cfg: ClassifierConfig) -> ReferenceHead:
    """The reference with the parameters of a head's config (``scale`` must be a number)."""
    p = cfg.magface
    return ReferenceHead(
        cfg.margin_type,
        float(cfg.scale),
        cfg.margin,
        subcenters=cfg.subcenters,
        combined=(cfg.combined.m1, cfg.combined.m2, cfg.combined.m3),
        straight_through=cfg.arcface_gradient == "straight_through",
        curricular_momentum=cfg.curricularface.momentum,
        adaface_h=cfg.adaface.h,
        adaface_momentum=cfg.adaface.momentum,
        magface=(p.l_a, p.u_a, p.l_m, p.u_m, p.lambda_g),
    )


def reference_logits(x, weight, labels, margin_type, scale, margin):
    """Full [N, C] logits with the margin on the target class (float64 in, float64 out)."""
    logits, _, _ = ReferenceHead(margin_type, scale, margin).logits(x, weight, labels, None, False)
    return logits


def reference_loss_and_grads(x, weight, labels, margin_type, scale, margin, classes=None):
    """Loss and (dx, dW) of the float64 reference; ``classes`` restricts the softmax."""
    ref = ReferenceHead(margin_type, scale, margin)
    return ref.loss_and_grads(x, weight, labels, classes, train=False)


def make_head(num_classes, dim, weight, group=None, **cfg):
    """A head over ``group`` whose local rows are this rank's slice of the full ``weight``
    (``[C * K, D]``, a class's K rows consecutive); ``cfg``: other ``ClassifierConfig``
    fields (margin sections as mappings or as their dataclasses)."""
    head = ShardedClassifier(classifier_config(num_classes, **cfg), dim, group)
    k = head.subcenters
    with torch.no_grad():
        start = head.class_start * k
        head.weight.copy_(weight[start : start + head.weight.shape[0]])
    return head


def classifier_config(num_classes: int, **fields) -> ClassifierConfig:
    """``ClassifierConfig`` whose margin sections may be given as mappings (as in YAML)."""
    hints = typing.get_type_hints(ClassifierConfig)
    for name, value in fields.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]):
            fields[name] = hints[name](**value)
    return ClassifierConfig(num_classes=num_classes, **fields)
