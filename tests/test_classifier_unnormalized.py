"""The unnormalized-feature LMCL ablation (``feature_norm=False``) against independent maths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_cosface.classifier import ClassifierConfig, ShardedClassifier


def _head(margin_type: str, feature_norm: bool, scale: float = 8.0) -> ShardedClassifier:
    cfg = ClassifierConfig(
        num_classes=11, margin_type=margin_type, scale=scale, margin=0.3, feature_norm=feature_norm
    )
    head = ShardedClassifier(cfg, 6, None).double()
    head.reset_parameters(seed=3)
    head.weight.data = head.weight.data.double() * 50  # non-unit rows: normalization matters
    return head


@pytest.mark.parametrize("margin_type", ["nsl", "cosface", "arcface"])
def test_equals_normalized_head_when_every_feature_has_norm_s(margin_type):
    """With ||x_i|| = s for all i the feature norm *is* the scale: both heads must agree."""
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(9, 6, generator=gen, dtype=torch.float64), dim=1) * 8.0
    labels = torch.tensor([0, 3, 3, 10, 5, 7, 1, 1, 2])
    losses, grads = [], []
    for feature_norm in (True, False):
        head = _head(margin_type, feature_norm)
        loss = head(x, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(head.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_cosface_matches_hand_written_formula_and_grads_flow_through_the_norm():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 6, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.tensor([4, 0, 9, 9, 2, 6, 10])
    head = _head("cosface", feature_norm=False)
    loss = head(x, labels)
    (gx,) = torch.autograd.grad(loss, x)

    x_ref = x.detach().clone().requires_grad_()
    w_hat = head.weight.detach() / head.weight.detach().norm(dim=1, keepdim=True)
    logits = x_ref @ w_hat.t()  # = ||x|| cos
    logits = logits - 0.3 * x_ref.norm(dim=1, keepdim=True) * F.one_hot(labels, 11)
    ref = F.cross_entropy(logits, labels)
    (gx_ref,) = torch.autograd.grad(ref, x_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)


def test_rejects_unsupported_combinations():
    with pytest.raises(ValueError, match="softmax never normalizes"):
        ClassifierConfig(num_classes=10, margin_type="softmax", feature_norm=False)
    with pytest.raises(ValueError, match="sample_rate 0.5"):
        ClassifierConfig(num_classes=10, sample_rate=0.5, feature_norm=False)
    head = ShardedClassifier(ClassifierConfig(num_classes=10, feature_norm=False), 4, None)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got \[12\]"):
        head(torch.randn(2, 4), torch.tensor([1, 12]))
