"""Multi-process tests of the sharded classifier against the float64 single-process reference.

Process start-up dominates on small CPUs, so each spawn runs every case inside the ranks and
covers two world sizes: a sub-group of the first ranks (an explicit, non-default group) and
the whole world. Each rank checks its own shard and its own embedding gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dist_cosface.classifier import (
    ClassifierConfig,
    ShardedClassifier,
    build_classifier_optimizer,
)
from dist_cosface.classifier.inputs import PeerInputError
from tests.classifier_ref import reference_loss_and_grads
from tests.multiproc import run_ranks

NUM_CLASSES, DIM = 23, 6  # 23 is prime: never divisible by the world size
COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "broadcast",
    "all_to_all_single",
    "all_gather_object",
    "barrier",
)


def _global_batch(world):
    """Uneven local batches (the last rank gets a short one) with duplicate labels."""
    gen = torch.Generator().manual_seed(10 + world)
    sizes = [5 - (r % 3) for r in range(world - 1)] + [2 if world > 1 else 6]
    x = torch.randn(sum(sizes), DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (sum(sizes),), generator=gen)
    labels[1] = labels[0] = NUM_CLASSES - 1  # duplicates, owned by the last rank
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    x[2] = -weight[labels[2]] + 0.05 * x[2]  # ArcFace's theta + m > pi branch
    return sizes, x, labels, weight


def _local(rank, sizes, tensor):
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def _head(weight, group, **kwargs):
    head = ShardedClassifier(ClassifierConfig(num_classes=NUM_CLASSES, **kwargs), DIM, group)
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start : head.class_start + head.num_local_classes])
    return head


def _step(head, rank, sizes, x, labels, dtype=torch.float32):
    xl = _local(rank, sizes, x).to(dtype).clone().requires_grad_()
    loss = head(xl, _local(rank, sizes, labels))
    loss.backward()
    return loss, xl.grad


def _check_full_softmax(rank, world, group, sizes, x, labels, weight, **kwargs):
    head = _head(weight, group, **kwargs)
    loss, grad_x = _step(head, rank, sizes, x, labels)
    ref, dx, dw = reference_loss_and_grads(x, weight, labels, kwargs["margin_type"], 8.0, 0.4)
    where = f"rank {rank}/{world} {kwargs}"
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5, msg=where)
    # gradient convention: world_size times the true gradient of the local embeddings
    torch.testing.assert_close(
        grad_x.double(), world * _local(rank, sizes, dx), rtol=1e-4, atol=1e-6, msg=where
    )
    rows = slice(head.class_start, head.class_start + head.num_local_classes)
    torch.testing.assert_close(head.weight.grad.double(), dw[rows], rtol=1e-4, atol=1e-6, msg=where)


def _sampled_classes(head, group):
    rows = head.last_sampled_rows + head.class_start
    per_rank = [None] * dist.get_world_size(group)
    dist.all_gather_object(per_rank, rows.tolist(), group=group)
    return torch.tensor(sorted(c for part in per_rank for c in part))


def _check_partial_fc(rank, world, group, sizes, x, labels, weight):
    head = _head(
        weight, group, margin_type="cosface", scale=8.0, margin=0.4, sample_rate=0.4, chunk_size=2
    )
    opt = build_classifier_optimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=0.05)
    before = head.weight.detach().clone()
    head.begin_step(3)
    loss, grad_x = _step(head, rank, sizes, x, labels)
    classes = _sampled_classes(head, group)
    local_pos = {c - head.class_start for c in labels.tolist()} & set(range(head.num_local_classes))
    rows = head.last_sampled_rows
    assert rows[: len(local_pos)].tolist() == sorted(local_pos), "positives first"
    assert len(rows) == max(math.ceil(0.4 * head.num_local_classes), len(local_pos))
    ref, dx, dw = reference_loss_and_grads(x, weight, labels, "cosface", 8.0, 0.4, classes)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        grad_x.double(), world * _local(rank, sizes, dx), rtol=1e-4, atol=1e-6
    )
    shard = slice(head.class_start, head.class_start + head.num_local_classes)
    torch.testing.assert_close(head.weight.grad.double(), dw[shard], rtol=1e-4, atol=1e-6)
    # two optimizer steps with different samples: unsampled rows keep weight AND momentum
    grad1 = head.weight.grad.clone()
    opt.step()
    used1 = torch.zeros(head.num_local_classes, dtype=torch.bool)
    used1[rows] = True
    upd1 = grad1 + 0.05 * before
    expect = torch.where(used1[:, None], before - 0.1 * upd1, before)
    torch.testing.assert_close(head.weight.detach(), expect, rtol=1e-6, atol=1e-7)
    buf1 = torch.where(used1[:, None], upd1, torch.zeros_like(upd1))
    torch.testing.assert_close(opt.state[head.weight]["momentum_buffer"], buf1)
    after1 = head.weight.detach().clone()
    opt.zero_grad()
    head.begin_step(4)
    _step(head, rank, sizes, x, labels)
    used2 = torch.zeros_like(used1)
    used2[head.last_sampled_rows] = True
    upd2 = head.weight.grad + 0.05 * after1
    buf2 = torch.where(used2[:, None], 0.9 * buf1 + upd2, buf1)
    expect = torch.where(used2[:, None], after1 - 0.1 * buf2, after1)
    opt.step()
    torch.testing.assert_close(head.weight.detach(), expect, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[head.weight]["momentum_buffer"], buf2)
    assert (~used2).any(), "the test needs rows that are left out"


def _count_collectives(rank, world, group, sizes, x, labels, weight):
    head = _head(weight, group, margin_type="cosface", chunk_size=3)
    calls: list[str] = []
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            if kwargs.get("group") is not group:
                raise AssertionError(f"{name} called without the head's explicit group")
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    try:
        for name, fn in saved.items():
            setattr(dist, name, counting(name, fn))
        xl = _local(rank, sizes, x).float().requires_grad_()
        loss = head(xl, _local(rank, sizes, labels))
        forward_calls = list(calls)
        loss.backward()
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    gathers = [c for c in forward_calls if c.startswith("all_gather")]
    assert len(gathers) == 3 and forward_calls.count("all_reduce") == 2, forward_calls
    assert len(forward_calls) == 5, forward_calls
    backward_calls = calls[len(forward_calls) :]
    assert len(backward_calls) == 1 and backward_calls[0].startswith("reduce_scatter"), calls


def _check_bad_input_fails_on_every_rank(rank, world, group, sizes, x, labels, weight):
    head = _head(weight, group)
    bad = _local(rank, sizes, labels).clone()
    if rank == world - 1:
        bad[0] = NUM_CLASSES + 4
    try:
        head(_local(rank, sizes, x).float(), bad)
    except ValueError as exc:
        message, peer = str(exc), isinstance(exc, PeerInputError)
    else:
        raise AssertionError("no error on bad labels")
    if rank == world - 1:
        assert f"[0, {NUM_CLASSES}), got [{NUM_CLASSES + 4}]" in message and not peer, message
    else:
        assert f"rank(s) [{world - 1}]" in message and peer, message
    # the group is still usable afterwards: the error did not leave a collective pending
    _step(head, rank, sizes, x, labels)


def _check_explicit_group_and_timing(rank, world, group, sizes, x, labels, weight):
    if group is not dist.group.WORLD:
        return
    cfg = ClassifierConfig(num_classes=NUM_CLASSES)
    try:  # no implicit default group: None means "no torch.distributed", refused here
        ShardedClassifier(cfg, DIM, None)
    except ValueError as exc:
        assert "process_group is None but torch.distributed is initialized" in str(exc), exc
    else:
        raise AssertionError("process_group=None was accepted with torch.distributed running")
    head = ShardedClassifier(cfg, DIM, dist.group.WORLD)
    assert head.comm.world_size == world and head.comm.rank == rank
    _step(head, rank, sizes, x, labels)
    assert head.step_report().comm_seconds is None  # not timed unless asked at construction
    head = ShardedClassifier(cfg, DIM, group, time_collectives=True)
    head.begin_step(0)
    _step(head, rank, sizes, x, labels)
    assert head.step_report().comm_seconds > 0


def _all_cases(rank, world, group):
    torch.manual_seed(0)
    sizes, x, labels, weight = _global_batch(world)
    data = (sizes, x, labels, weight)
    for margin_type in ("softmax", "nsl", "cosface", "arcface"):
        for chunk_size, materialize in ((None, False), (2, False), (None, True)):
            _check_full_softmax(
                rank,
                world,
                group,
                *data,
                margin_type=margin_type,
                scale=8.0,
                margin=0.4,
                chunk_size=chunk_size,
                materialize=materialize,
            )
    _check_partial_fc(rank, world, group, *data)
    _count_collectives(rank, world, group, *data)
    _check_bad_input_fails_on_every_rank(rank, world, group, *data)
    _check_explicit_group_and_timing(rank, world, group, *data)


def _two_world_sizes(rank, world, sub_world):
    """All cases on ranks [0, sub_world) as a sub-group, then on the whole world."""
    sub_group = dist.new_group(list(range(sub_world)), backend="gloo")  # collective: all ranks
    if rank < sub_world:
        _all_cases(rank, sub_world, sub_group)
    else:
        # a rank outside the group must be refused, not left waiting in a collective
        try:
            ShardedClassifier(ClassifierConfig(num_classes=NUM_CLASSES), DIM, sub_group)
        except ValueError as exc:
            assert "not a member" in str(exc) and f"rank {rank}" in str(exc), str(exc)
        else:
            raise AssertionError("a non-member rank was accepted")
    _all_cases(rank, world, dist.group.WORLD)
    return "ok"


@pytest.mark.multiproc
def test_world_sizes_1_and_2_match_reference_on_gloo():
    assert run_ranks(2, _two_world_sizes, 1, timeout_s=120) == ["ok"] * 2


@pytest.mark.multiproc
@pytest.mark.slow
def test_world_sizes_3_and_4_match_reference_on_gloo():
    assert run_ranks(4, _two_world_sizes, 3, timeout_s=150) == ["ok"] * 4
