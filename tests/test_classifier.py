"""Single-process tests of the sharded classifier against the float64 reference
(tests/classifier_ref.py)."""

from __future__ import annotations

import math

import pytest
import torch

from dist_cosface.classifier import (
    ClassifierConfig,
    ShardedClassifier,
    build_classifier_optimizer,
    class_range,
    scale_lower_bound,
)
from dist_cosface.configtools import ConfigError, from_mapping
from dist_cosface.sharding import is_sharded
from tests.classifier_ref import MARGINS, make_head, reference_loss_and_grads


@pytest.mark.parametrize("margin_type", MARGINS)
@pytest.mark.parametrize("chunk_size,materialize", [(None, False), (4, False), (None, True)])
def test_single_process_matches_reference(margin_type, chunk_size, materialize):
    gen = torch.Generator().manual_seed(1)
    num_classes, dim, batch = 19, 6, 9
    weight = torch.randn(num_classes, dim, generator=gen)
    x = torch.randn(batch, dim, generator=gen)
    labels = torch.tensor([0, 3, 3, 18, 7, 7, 7, 1, 12])
    x[0] = -weight[0] + 0.05 * x[0]  # theta close to pi: exercises ArcFace's fallback branch
    head = make_head(
        num_classes,
        dim,
        weight,
        margin_type=margin_type,
        scale=16.0,
        margin=0.5,
        chunk_size=chunk_size,
        materialize=materialize,
    )
    xl = x.clone().requires_grad_()
    loss = head(xl, labels)
    loss.backward()
    ref, dx, dw = reference_loss_and_grads(x, weight, labels, margin_type, 16.0, 0.5)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xl.grad.double(), dx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), dw, rtol=1e-4, atol=1e-6)


def test_float64_head_is_exact():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (7,), generator=gen)
    head = make_head(11, 5, weight.float(), margin_type="arcface", chunk_size=3).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    xl = x.clone().requires_grad_()
    head(xl, labels).backward()
    _, dx, dw = reference_loss_and_grads(x, weight, labels, "arcface", 64.0, 0.35)
    torch.testing.assert_close(xl.grad, dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, dw, rtol=1e-10, atol=1e-12)


def test_loss_does_not_saturate_on_hopeless_targets():
    # every target is at the opposite pole, s = 64: the exact loss is s (1 + m) + log 2 = 87.1,
    # above the 69.08 = -log(1e-30) that a clamped probability would produce
    weight = torch.eye(4, 3)[:3]  # [3, 3]
    x = -weight.clone()
    labels = torch.arange(3)
    loss = make_head(3, 3, weight, margin_type="cosface")(x, labels)
    ref, _, _ = reference_loss_and_grads(x, weight, labels, "cosface", 64.0, 0.35)
    assert loss.item() == pytest.approx(64 * 1.35 + math.log(2), rel=1e-5)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close_at_scale_64(dtype):
    gen = torch.Generator().manual_seed(3)
    num_classes, dim, batch = 300, 32, 16
    weight = torch.randn(num_classes, dim, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    # embeddings almost equal to their class rows: target cosines ~ 1, logits ~ 64
    x = weight[labels] * 5 + 0.05 * torch.randn(batch, dim, generator=gen)
    results = {}
    for dt in (torch.float32, dtype):
        head = make_head(num_classes, dim, weight, margin_type="cosface", chunk_size=64)
        xl = x.to(dt).detach().clone().requires_grad_()
        loss = head(xl, labels)
        loss.backward()
        results[dt] = (loss.detach(), xl.grad.float(), head.weight.grad)
        assert torch.isfinite(loss) and torch.isfinite(xl.grad).all()
        assert torch.isfinite(head.weight.grad).all()
    (l32, gx32, gw32), (lh, gxh, gwh) = results[torch.float32], results[dtype]
    assert lh.dtype == torch.float32  # statistics stay fp32
    torch.testing.assert_close(lh, l32, rtol=3e-2, atol=3e-2)
    assert (gxh - gx32).norm() <= 0.1 * gx32.norm()
    assert (gwh - gw32).norm() <= 0.1 * gw32.norm()


def test_autocast_uses_half_matmuls_with_fp32_statistics():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(50, 16, generator=gen)
    x = torch.randn(8, 16, generator=gen)
    labels = torch.randint(0, 50, (8,), generator=gen)
    head = make_head(50, 16, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, labels)
    ref, _, _ = reference_loss_and_grads(x, weight, labels, "cosface", 64.0, 0.35)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=5e-2, atol=0.3)
    exact = make_head(50, 16, weight)(x, labels)
    assert loss.item() != exact.item()  # the bf16 path really ran


def test_class_range_is_the_dtensor_shard0_layout():
    for num_classes, world in [(10, 3), (7, 7), (23, 4), (5, 1), (9, 2)]:
        ranges = [class_range(num_classes, world, r) for r in range(world)]
        chunks = torch.arange(num_classes).chunk(world)  # what DTensor Shard(0) uses
        assert ranges == [(int(c[0]), len(c)) for c in chunks]
    with pytest.raises(ValueError, match=r"ceil\(5/4\)=2, which leaves rank 3 without"):
        class_range(5, 4, 0)


def test_head_without_group_is_single_process_and_sharded_weight():
    head = ShardedClassifier(ClassifierConfig(num_classes=10), 4, None)
    assert head.class_start == 0 and head.num_local_classes == 10
    assert head.weight.shape == (10, 4) and is_sharded(head.weight)
    assert head.comm.group is None


def test_init_does_not_depend_on_world_size():
    head = ShardedClassifier(ClassifierConfig(num_classes=70000), 2, None)
    head.reset_parameters(seed=5)
    full = head.weight.detach().clone()
    assert 0.009 < full.std().item() < 0.011
    # the same seed rebuilds identical rows for any class range (what rank r would hold)
    part = ShardedClassifier(ClassifierConfig(num_classes=70000), 2, None)
    part.class_start, part.num_local_classes = 60000, 8000
    part.weight = torch.nn.Parameter(torch.empty(8000, 2))
    part.reset_parameters(seed=5)
    torch.testing.assert_close(part.weight.detach(), full[60000:68000], rtol=0, atol=0)


def test_scale_lower_bound_and_auto_scale():
    c, p = 10000, 0.9
    assert scale_lower_bound(c, p) == pytest.approx((c - 1) / c * math.log((c - 1) * p / (1 - p)))
    assert scale_lower_bound(c, 0.99) > scale_lower_bound(c, 0.9)
    head = ShardedClassifier(ClassifierConfig(num_classes=c, scale="auto", scale_p_w=0.95), 4, None)
    assert head.scale == pytest.approx(scale_lower_bound(c, 0.95))
    with pytest.raises(ValueError, match="p_w"):
        scale_lower_bound(c, 1.0)


def test_head_from_config_and_config_validation():
    cfg = from_mapping(
        ClassifierConfig,
        {
            "num_classes": 12,
            "margin_type": "arcface",
            "margin": 0.5,
            "scale": "auto",
            "chunk_size": 4,
        },
    )
    head = ShardedClassifier(cfg, 8, None)
    assert head.spec.margin_type == "arcface" and head.cfg.chunk_size == 4
    with pytest.raises(TypeError, match="cfg must be a ClassifierConfig"):
        ShardedClassifier(12, 8, None)  # the keyword-argument form is gone
    with pytest.raises(ValueError, match="embedding_size must be a positive integer"):
        ShardedClassifier(cfg, 0, None)
    assert head.scale == pytest.approx(scale_lower_bound(12, 0.9))
    with pytest.raises(ConfigError, match="sample_seeed"):
        from_mapping(ClassifierConfig, {"sample_seeed": 1})
    with pytest.raises(ConfigError, match="scale_p_w"):
        from_mapping(ClassifierConfig, {"scale_p_w": 1.5})


@pytest.mark.parametrize(
    "embeddings,labels,error,match",
    [
        (torch.zeros(3, 4), torch.tensor([0, 1, 10]), ValueError, r"\[0, 10\), got \[10\]"),
        (torch.zeros(3, 4), torch.tensor([0, -1, 2]), ValueError, r"got \[-1\]"),
        (torch.zeros(3, 4), torch.tensor([0, 1, 2], dtype=torch.int32), TypeError, "int32"),
        (torch.zeros(3, 5), torch.tensor([0, 1, 2]), ValueError, r"\[B, 4\], got \[3, 5\]"),
        (torch.zeros(3, 4), torch.tensor([0, 1]), ValueError, r"shape \[3\].*got \[2\]"),
        (torch.zeros(3, 4, dtype=torch.long), torch.tensor([0, 1, 2]), TypeError, "floating"),
        ([[0.0] * 4], torch.tensor([0]), TypeError, "list"),
    ],
)
def test_bad_inputs_raise_naming_the_values(embeddings, labels, error, match):
    head = ShardedClassifier(ClassifierConfig(num_classes=10), 4, None)
    with pytest.raises(error, match=match):
        head(embeddings, labels)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"margin_type": "cos"}, "margin_type"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"scale": -1.0}, "scale"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"margin": -0.1}, "margin"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"scale": "64"}, "scale"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"kernel": "cuda"}, "kernel"),
    ],
)
def test_bad_config_arguments(kwargs, match):
    """Direct construction (as in code and tests) applies the checks a YAML load applies."""
    with pytest.raises(ValueError, match=f"^{match} must be"):
        ClassifierConfig(**{"num_classes": 10, **kwargs})


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_row_optimizer_equals_torch_optimizer_when_every_row_is_used(name):
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(13, 4, generator=gen)
    head = make_head(13, 4, weight, chunk_size=5)
    twin = torch.nn.Parameter(weight.clone())
    opt = build_classifier_optimizer(
        head, name, lr=0.05, momentum=0.9, weight_decay=0.01, betas=(0.8, 0.99)
    )
    if name == "sgd":
        ref = torch.optim.SGD([twin], lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        ref = torch.optim.AdamW([twin], lr=0.05, betas=(0.8, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for _ in range(4):
        x = torch.randn(6, 4, generator=gen)
        labels = torch.randint(0, 13, (6,), generator=gen)
        opt.zero_grad()
        head(x, labels).backward()
        twin.grad = head.weight.grad.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    torch.testing.assert_close(head.weight.detach(), twin.detach(), rtol=1e-5, atol=1e-6)
    for value in opt.state[head.weight].values():
        assert value.shape[0] == 13  # row-aligned state for checkpoint resharding


def test_adamw_touches_only_sampled_rows_and_round_trips():
    head = ShardedClassifier(ClassifierConfig(num_classes=9, sample_rate=0.5), 3, None)
    opt = build_classifier_optimizer(head, "adamw", lr=0.1, weight_decay=0.1)
    before = head.weight.detach().clone()
    head(torch.randn(4, 3), torch.tensor([0, 1, 2, 8])).backward()
    used = torch.zeros(9, dtype=torch.bool)
    used[head.last_sampled_rows] = True
    opt.step()
    state = opt.state[head.weight]
    assert torch.equal(head.weight.detach()[~used], before[~used])  # no decoupled decay
    assert (head.weight.detach()[used] != before[used]).all()
    assert not state["exp_avg"][~used].any() and not state["exp_avg_sq"][~used].any()
    assert torch.equal(state["row_step"], used.float())
    assert not head.touched.any()  # cleared for the next accumulation window
    clone = build_classifier_optimizer(head, "adamw", lr=0.1)
    clone.load_state_dict(opt.state_dict())
    for key, value in opt.state[head.weight].items():
        torch.testing.assert_close(clone.state[head.weight][key], value, rtol=0, atol=0)
    assert opt.state[head.weight]["row_step"].sum() == 5  # ceil(0.5 * 9) rows stepped once


def test_partial_fc_sampling_is_deterministic_per_step():
    cfg = ClassifierConfig(num_classes=1000, sample_rate=0.1, sample_seed=3)
    head = ShardedClassifier(cfg, 4, None)
    x, labels = torch.randn(8, 4), torch.tensor([5, 5, 17, 999, 0, 400, 401, 5])
    draws = {}
    for step in (7, 8, 7):
        head.begin_step(step)
        head(x, labels)
        first = head.last_sampled_rows.clone()
        head(x, labels)  # second micro-step of the same step: a different stream
        draws.setdefault(step, []).append((first, head.last_sampled_rows.clone()))
    (a1, a2), (b1, _), (c1, c2) = draws[7][0], draws[8][0], draws[7][1]
    assert torch.equal(a1, c1) and torch.equal(a2, c2)  # resume at step 7 repeats it
    assert not torch.equal(a1, b1) and not torch.equal(a1, a2)
    positives = sorted(set(labels.tolist()))
    assert a1[: len(positives)].tolist() == positives  # positives first, sorted
    assert len(a1) == 100 and len(set(a1.tolist())) == 100
    head.eval()
    head(x, labels)
    assert head.last_sampled_rows is None  # evaluation uses every class


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_head_matches_reference(dtype):
    gen = torch.Generator().manual_seed(7)
    num_classes, dim, batch = 5000, 64, 96
    weight = torch.randn(num_classes, dim, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    x = weight[labels] + 0.5 * torch.randn(batch, dim, generator=gen)
    for sample_rate in (1.0, 0.3):
        head = make_head(num_classes, dim, weight, sample_rate=sample_rate).cuda()
        xl = x.to("cuda", dtype).requires_grad_()
        loss = head(xl, labels.cuda())
        loss.backward()
        rows = head.last_sampled_rows
        classes = None if rows is None else rows.cpu()
        ref, dx, dw = reference_loss_and_grads(x, weight, labels, "cosface", 64.0, 0.35, classes)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(loss.double().cpu(), ref, rtol=tol, atol=tol)
        assert (xl.grad.double().cpu() - dx).norm() <= 10 * tol * dx.norm()
        assert (head.weight.grad.double().cpu() - dw).norm() <= 10 * tol * dw.norm()


def test_optimizer_updates_the_union_of_micro_step_samples():
    cfg = ClassifierConfig(num_classes=40, sample_rate=0.1, sample_seed=1)
    head = ShardedClassifier(cfg, 3, None)
    opt = build_classifier_optimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=0.1)
    before = head.weight.detach().clone()
    head.begin_step(0)
    used = torch.zeros(40, dtype=torch.bool)
    for labels in (torch.tensor([1, 2]), torch.tensor([30, 31])):  # two micro-steps
        head(torch.randn(2, 3), labels).backward()
        used[head.last_sampled_rows] = True
    assert used.sum() > 4  # each micro-step drew its own negatives
    opt.step()
    changed = (head.weight.detach() != before).any(dim=1)
    assert torch.equal(changed, used)
    assert torch.equal(opt.state[head.weight]["momentum_buffer"].abs().sum(dim=1) > 0, used)
