"""Margin-health statistics (classifier/health.py) against a float64 reference on the same
batch: one process and real gloo groups of 1, 2 and 3 ranks, every margin type, Partial FC;
the Triton kernels (``kernel="triton"``) under Triton's CPU interpreter in subprocesses."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_cosface.classifier import scale_lower_bound
from dist_cosface.classifier.health import MarginHealth
from tests.classifier_ref import make_head
from tests.multiproc import run_ranks

ROOT = Path(__file__).resolve().parents[1]
INTERP_ENV = {"TRITON_INTERPRET": "1"}
NUM_CLASSES, DIM = 23, 6
MARGINS = ("softmax", "nsl", "cosface", "arcface")
SCALE, MARGIN = 8.0, 0.4


def _batch(world: int):
    """Uneven local batches (the last rank gets a short one), duplicate labels, and one
    sample in ArcFace's theta + m > pi branch."""
    gen = torch.Generator().manual_seed(30 + world)
    sizes = [7 - (r % 3) for r in range(world - 1)] + [3 if world > 1 else 11]
    x = torch.randn(sum(sizes), DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (sum(sizes),), generator=gen)
    labels[1] = labels[0] = NUM_CLASSES - 1
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    weight *= torch.rand(NUM_CLASSES, 1, generator=gen, dtype=torch.float64) + 0.5
    weight = weight.float().double()  # the head's weight is fp32: same values here
    x[2] = -weight[labels[2]] + 0.05 * x[2]
    for i in range(3, 6):  # a few samples near their class: not every sample violates
        x[i] = weight[labels[i]] + 0.2 * x[i]
    return sizes, x, labels, weight


def reference(x, weight, labels, margin_type, used_classes=None) -> dict[str, float]:
    """float64 statistics of the global batch, written independently of the head."""
    x, weight = x.double(), weight.double()
    if margin_type == "softmax":
        cos = x @ weight.t()
    else:
        cos = (x / x.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).t()
    rows = torch.arange(len(labels))
    tgt = cos[rows, labels]
    usable = torch.zeros_like(cos, dtype=torch.bool)
    usable[:, used_classes if used_classes is not None else slice(None)] = True
    usable[rows, labels] = False
    neg = cos.masked_fill(~usable, -math.inf).amax(dim=1)
    if margin_type == "cosface":
        bar = tgt - MARGIN
    elif margin_type == "arcface":
        theta = torch.arccos(tgt.clamp(-1, 1))
        bar = torch.where(
            theta + MARGIN < math.pi, torch.cos(theta + MARGIN), tgt - math.sin(MARGIN) * MARGIN
        )
    else:
        bar = tgt
    return {
        "target_cos_mean": tgt.mean().item(),
        "target_cos_p10": float(np.quantile(tgt.numpy(), 0.1)),
        "hardest_neg_cos_mean": neg.mean().item(),
        "margin_violation_rate": (neg > bar).double().mean().item(),
    }


def _head(weight, group, margin_type, **kwargs):
    cfg = dict(margin_type=margin_type, scale=SCALE, margin=MARGIN, **kwargs)
    return make_head(NUM_CLASSES, DIM, weight, group, **cfg)


def _local(rank, sizes, tensor):
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def _used_classes(head, group) -> torch.Tensor | None:
    """Global ids of the classes every rank used in the last forward (None: all)."""
    if head.last_sampled_rows is None:
        return None
    mine = (head.last_sampled_rows + head.class_start).tolist()
    if group is None:
        return torch.tensor(mine)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return torch.tensor(sorted(c for part in everyone for c in part))


def check_case(
    rank, group, data, margin_type, dtype, sample_rate=1.0, chunk_size=None, kernel="torch"
):
    sizes, x, labels, weight = data
    head = _head(
        weight, group, margin_type, sample_rate=sample_rate, chunk_size=chunk_size, kernel=kernel
    )
    head.begin_step(3, collect_health=True)
    xl = _local(rank, sizes, x).to(dtype).requires_grad_()
    head(xl, _local(rank, sizes, labels)).backward()
    health = head.step_report().health
    assert isinstance(health, MarginHealth)
    got = health.to_floats()
    used = _used_classes(head, group)
    ref = reference(x.to(dtype), weight, labels, margin_type, used)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    where = f"rank {rank} {kernel} {margin_type} {dtype} rate={sample_rate} chunk={chunk_size}"
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=tol), f"{where}: {key}"
    own = weight[head.class_start : head.class_start + head.num_local_classes].norm(dim=1)
    assert got["weight_norm_min"] == pytest.approx(own.min().item(), rel=1e-6), where
    assert got["weight_norm_mean"] == pytest.approx(own.mean().item(), rel=1e-6), where
    assert got["weight_norm_max"] == pytest.approx(own.max().item(), rel=1e-6), where
    n_used = head.num_local_classes if used is None else len(head.last_sampled_rows)
    assert got["sampled_classes"] == n_used, where
    assert got["classes_seen_fraction"] == pytest.approx(n_used / head.num_local_classes)
    if margin_type == "softmax":
        assert "logit_scale" not in got and got["margin"] == 0.0
    else:
        assert got["logit_scale"] == SCALE and got["margin"] == MARGIN
        assert got["scale_lower_bound"] == pytest.approx(scale_lower_bound(NUM_CLASSES, 0.9))
    assert head.step_report().health is None  # consumed: a later log needs a new forward


def all_cases(rank, group, world):
    data = _batch(world)
    for margin_type in MARGINS:
        for dtype in (torch.float64, torch.float32):
            check_case(rank, group, data, margin_type, dtype)
        check_case(rank, group, data, margin_type, torch.float64, chunk_size=2)
        check_case(rank, group, data, margin_type, torch.float64, sample_rate=0.3)
    check_case(rank, group, data, "cosface", torch.float32, sample_rate=0.5, chunk_size=3)
    check_collectives_unchanged(rank, group, data)


def triton_cases(rank, group, world):
    """The Triton path's statistics (fp32: the kernels take no float64) against the same
    reference; must run with ``TRITON_INTERPRET=1`` set before triton's first import."""
    from tests.triton_interp_cases import require_interpreter

    require_interpreter()
    data = _batch(world)
    for margin_type in MARGINS:
        check_case(rank, group, data, margin_type, torch.float32, kernel="triton")
    check_case(rank, group, data, "arcface", torch.float32, sample_rate=0.3, kernel="triton")
    check_collectives_unchanged(rank, group, data, kernel="triton")


def _triton_ranks_main(rank, world):
    triton_cases(rank, dist.group.WORLD, world)
    return "ok"


def check_collectives_unchanged(rank, group, data, kernel="torch"):
    """Statistics ride in the loss's existing all-reduces: same count, wider tensors."""
    if group is None:
        return
    sizes, x, labels, weight = data
    calls: list[tuple[str, tuple]] = []
    real_all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(("all_reduce", tuple(tensor.shape)))
        return real_all_reduce(tensor, *args, **kwargs)

    shapes = {}
    for want in (False, True):
        head = _head(weight, group, "cosface", kernel=kernel)
        head.begin_step(0, collect_health=want)
        calls.clear()
        dist.all_reduce = counting
        try:
            head(_local(rank, sizes, x).float(), _local(rank, sizes, labels))
        finally:
            dist.all_reduce = real_all_reduce
        shapes[want] = list(calls)
    n = len(labels)
    assert shapes[False] == [("all_reduce", (n,)), ("all_reduce", (2, n))]
    assert shapes[True] == [("all_reduce", (2, n)), ("all_reduce", (3, n))]


def _ranks_main(rank, world):
    """Gloo groups of 1 and 2 ranks (sub-groups: every rank creates them), then the world."""
    for size in (1, 2):
        group = dist.new_group(list(range(size)), backend="gloo")
        if rank < size:
            all_cases(rank, group, size)
    all_cases(rank, dist.group.WORLD, world)
    return "ok"


def test_one_process_matches_reference():
    all_cases(0, None, 1)


@pytest.mark.multiproc
def test_one_two_and_three_gloo_ranks_match_reference():
    assert run_ranks(3, _ranks_main, timeout_s=240) == ["ok"] * 3


def test_triton_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    code = "from tests.test_health import triton_cases; triton_cases(0, None, 1); print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **INTERP_ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.multiproc
def test_triton_kernels_on_two_gloo_ranks_match_reference():
    pytest.importorskip("triton")
    assert run_ranks(2, _triton_ranks_main, env=INTERP_ENV, timeout_s=600) == ["ok"] * 2


def test_loss_and_gradients_do_not_depend_on_collecting():
    sizes, x, labels, weight = _batch(1)
    results = []
    for want in (False, True):
        head = _head(weight.float(), None, "arcface", chunk_size=4)
        head.begin_step(0, collect_health=want)
        xl = x.float().requires_grad_()
        loss = head(xl, labels)
        loss.backward()
        results.append((loss.detach(), xl.grad, head.weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_classes_seen_accumulate_within_an_epoch_and_reset_on_a_new_one():
    sizes, x, labels, weight = _batch(1)
    x, labels = x[:3], labels[:3]  # 2 positives: the sample of 5 classes has 3 negatives
    head = _head(weight.float(), None, "cosface", sample_rate=0.2)
    head.set_epoch(0)
    union = set()
    for step in range(3):
        head.begin_step(step, collect_health=True)
        head(x.float(), labels)
        union |= set(head.last_sampled_rows.tolist())
        got = head.step_report().health.to_floats()
        assert got["classes_seen_fraction"] == pytest.approx(len(union) / NUM_CLASSES)
    assert len(union) > len(head.last_sampled_rows)  # the steps sampled different negatives
    head.set_epoch(0)  # same epoch: nothing forgotten
    assert int(head.seen.sum()) == len(union)
    head.set_epoch(1)
    head.begin_step(3, collect_health=True)
    head(x.float(), labels)
    got = head.step_report().health.to_floats()
    assert got["classes_seen_fraction"] == pytest.approx(len(head.last_sampled_rows) / NUM_CLASSES)


def test_no_statistics_without_collecting_or_in_eval_mode():
    sizes, x, labels, weight = _batch(1)
    head = _head(weight.float(), None, "cosface", sample_rate=0.2)
    head(x.float(), labels)
    assert head.step_report().health is None
    assert head.seen.any()
    head.set_epoch(1)
    head.eval()
    with torch.no_grad():
        head(x.float(), labels)
    assert not head.seen.any()  # evaluation forwards are not training classes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_matches_reference_with_no_extra_sync(dtype, kernel):
    import warnings

    if kernel == "triton":
        pytest.importorskip("triton")
    sizes, x, labels, weight = _batch(1)
    head = _head(weight.float(), None, "cosface", kernel=kernel).cuda()
    syncs = {}
    for want in (False, True):
        head.begin_step(0, collect_health=want)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")  # every synchronising call warns
            try:
                head(x.cuda().to(dtype), labels.cuda())
                health = head.step_report().health
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[want] = len(caught)
    assert syncs[True] == syncs[False], syncs  # to_floats() below is the only new copy
    got = health.to_floats()
    ref = reference(x.to(dtype).double(), weight, labels, "cosface")
    for key in ("target_cos_mean", "target_cos_p10", "hardest_neg_cos_mean"):
        assert got[key] == pytest.approx(ref[key], abs=1e-2), key
    # a near-tie may flip in half precision: at most one sample of the batch
    assert abs(got["margin_violation_rate"] - ref["margin_violation_rate"]) <= 1 / len(labels)
