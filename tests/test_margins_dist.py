"""Multi-process tests of the margin types and sub-centers against the float64 reference.

One 3-rank gloo spawn covers world sizes 1, 2 and 3 (groups of the first ranks): every
margin type x (full softmax, Partial FC) x (fp32, bf16 autocast), half of the cases with three
sub-centers, plus the straight-through ArcFace/combined gradient, over two training forwards
with uneven local batches, checked against ``tests/classifier_ref.py`` (loss, the local
embeddings' gradient = world x reference, the weight shard's gradient); the running
statistics, returned to the test, must be EQUAL at every world size; the collectives per
forward; the sub-center initialisation independent of the world size. The same spawn resumes
a world-2 run (CurricularFace with 3 sub-centers, AdaFace with 2) from a ``ClassifierState``
checkpoint on 3 ranks and on 1 rank: identical next losses.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_cosface.classifier import build_classifier_optimizer
from dist_cosface.classifier.comm import Comm
from dist_cosface.classifier.state import ClassifierState
from dist_cosface.engine.checkpoint.manager import run_dcp
from tests.classifier_ref import ALL_MARGINS, make_head, reference_head
from tests.multiproc import run_ranks

C, D = 23, 6  # 23 is prime: never divisible by the world size
SIZES = {1: [12], 2: [7, 5], 3: [5, 4, 3]}  # the same global batch of 12, split unevenly
SECTIONS = {
    "combined": {"combined": {"m1": 1.0, "m2": 0.4, "m3": 0.1}},
    "curricularface": {"curricularface": {"momentum": 0.5}},
    "adaface": {"adaface": {"h": 1.0, "momentum": 0.9}},
    "magface": {"magface": {"l_a": 2.0, "u_a": 6.0, "l_m": 0.3, "u_m": 0.7, "lambda_g": 2.0}},
}
# every margin type x (full softmax, Partial FC) x (fp32, bf16); three sub-centers on half of
# them, so that each margin type meets sub-centers with and without Partial FC and in both
# precisions
CASES = [
    (margin_type, 3 if (rate < 1) != (dtype == "bf16") else 1, rate, dtype, {})
    for margin_type in ALL_MARGINS
    for rate in (1.0, 0.4)
    for dtype in ("fp32", "bf16")
]
# arcface_torch's straight-through margin gradient, sharded: with Partial FC in fp32 and with
# sub-centers in bf16
STRAIGHT_THROUGH = {"arcface_gradient": "straight_through"}
CASES += [
    ("combined", 1, 0.4, "fp32", STRAIGHT_THROUGH),
    ("arcface", 3, 1.0, "bf16", STRAIGHT_THROUGH),
]


def _cfg(margin_type, **fields):
    out = dict(margin_type=margin_type, scale=8.0, margin=0.4, chunk_size=4)
    out.update(SECTIONS.get(margin_type, {}))
    out.update(fields)
    return out


@functools.cache
def _data(seed: int, k: int):
    """Global weight [C * k, D] and two global batches (raw embeddings with varied norms,
    duplicate labels, one sample near the opposite pole of its class)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(C * k, D, generator=gen, dtype=torch.float64).float().double()
    batches = []
    for _ in range(2):
        x = torch.randn(12, D, generator=gen, dtype=torch.float64)
        x *= 0.5 + 7.5 * torch.rand(12, 1, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, C, (12,), generator=gen)
        labels[1] = labels[0] = C - 1
        # theta ~ pi - 0.15: the fallback branches (not pi itself: acos has no derivative)
        pole = weight[labels[2] * k]
        x[2] = -3.0 * pole + 0.45 * x[2] / x[2].norm() * pole.norm()
        batches.append((x.float().double(), labels))
    return _separate_subcenters(weight, batches, k, gen), batches


def _separate_subcenters(weight, batches, k, gen, gap=0.01):
    """Redraw a class's runner-up sub-center wherever a sample sits within ``gap`` of a tie
    between two sub-centers: the nearest one is a discrete choice that bf16 rounding may make
    differently from the float64 reference there (both are right; the test needs one)."""
    x = torch.cat([b[0] for b in batches])
    x = x / x.norm(dim=1, keepdim=True)
    for _ in range(100):
        if k == 1:
            return weight
        top = ((x @ (weight / weight.norm(dim=1, keepdim=True)).T).view(len(x), C, k)).topk(2)
        ties = (top.values[..., 0] - top.values[..., 1]) < gap  # [N, C]
        if not ties.any():
            return weight
        rows = sorted({j * k + int(top.indices[i, j, 1]) for i, j in ties.nonzero().tolist()})
        weight[rows] = (
            torch.randn(len(rows), D, generator=gen, dtype=torch.float64).float().double()
        )
    raise AssertionError("could not separate the sub-centers")


def _local(rank, world, tensor):
    start = sum(SIZES[world][:rank])
    return tensor[start : start + SIZES[world][rank]]


def _sampled_classes(head, group):
    mine = (head.last_sampled_rows + head.class_start).tolist()
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return torch.tensor(sorted(c for part in parts for c in part))


def _close(got, want, rel, where):
    """fp32: elementwise; bf16: relative to the reference's norm (half-precision matmuls)."""
    got = got.double()
    if rel is None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6, msg=lambda m: f"{where}: {m}")
    elif (got - want).norm() > rel * max(want.norm().item(), 1e-3):
        raise AssertionError(f"{where}: |got - want| = {(got - want).norm():.3g}, |want| = "
                             f"{want.norm():.3g}")  # fmt: skip


def _check_case(rank, world, group, case_index):
    margin_type, k, rate, dtype, extra = CASES[case_index]
    weight, batches = _data(100 + case_index, k)
    cfg = _cfg(margin_type, subcenters=k, sample_rate=rate, **extra)
    head = make_head(C, D, weight.float(), group, **cfg)
    ref = reference_head(head.cfg)
    rel = 0.05 if dtype == "bf16" else None
    for step, (x, labels) in enumerate(batches):
        head.begin_step(step)
        head.weight.grad = None
        xl = _local(rank, world, x).float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = head(xl, _local(rank, world, labels))
        loss.backward()
        classes = _sampled_classes(head, group) if rate < 1 else None
        ref_loss, dx, dw = ref.loss_and_grads(x, weight, labels, classes)
        where = f"world {world} rank {rank} {CASES[case_index]} step {step}"
        if rel is None:
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5, msg=where)
        else:
            assert abs(loss.item() - ref_loss.item()) <= 0.02 * ref_loss.item(), where
        _close(xl.grad, world * _local(rank, world, dx), rel, where + " dx")
        rows = slice(head.class_start * k, (head.class_start + head.num_local_classes) * k)
        _close(head.weight.grad, dw[rows], rel, where + " dW")
        stats = {name: float(v) for name, v in head.margin_state.stats.items()}
        # bf16: the target cosines come from the bf16-rounded embeddings
        tol = 1e-6 if rel is None else 1e-2
        assert stats == pytest.approx(ref.stats, rel=tol, abs=tol), where
    return stats


def _count_collectives(rank, world, group, margin_type, k):
    """Collectives of one forward and its backward (through the head's ``Comm``)."""
    calls = []
    original = Comm._run

    def counting(self, fn, *args, **kwargs):
        calls.append(fn.__name__)
        return original(self, fn, *args, **kwargs)

    weight, batches = _data(7, k)
    head = make_head(C, D, weight.float(), group, **_cfg(margin_type, subcenters=k))
    x, labels = batches[0]
    Comm._run = counting
    try:
        loss = head(_local(rank, world, x).float().requires_grad_(), _local(rank, world, labels))
        forward = list(calls)
        loss.backward()
    finally:
        Comm._run = original
    return forward.count("all_reduce"), len(forward), calls[len(forward) :]


def _init_rows(head_k: int, group):
    head = make_head(C, D, torch.zeros(C * head_k, D), group, subcenters=head_k)
    head.reset_parameters(seed=5)
    return head.class_start, head.weight.detach().numpy().copy()


def _per_world(rank, world, group):
    stats = [_check_case(rank, world, group, i) for i in range(len(CASES))]
    counts = {
        (m, k): _count_collectives(rank, world, group, m, k)
        for m, k in (("cosface", 1), ("curricularface", 3), ("adaface", 1), ("magface", 3))
    }
    return {"stats": stats, "counts": counts, "init": _init_rows(3, group)}


# ---- resume on another rank count ---------------------------------------------------------

RESUMED = [("curricularface", 3), ("adaface", 2)]


def _resume_batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(12, D, generator=gen, dtype=torch.float64)
    x *= 0.5 + 7.5 * torch.rand(12, 1, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, C, (12,), generator=gen)


def _train_step(head, opt, rank, world, step):
    x, labels = _resume_batch(step)
    head.begin_step(step)
    loss = head(_local(rank, world, x), _local(rank, world, labels))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _state(head, opt, group):
    from torch.distributed.device_mesh import DeviceMesh

    return ClassifierState(head, opt, DeviceMesh.from_group(group, "cpu"))


def _fresh(margin_type, k, group, seed):
    head = make_head(C, D, torch.zeros(C * k, D), group, **_cfg(margin_type, subcenters=k))
    head = head.double()
    head.reset_parameters(seed)
    return head, build_classifier_optimizer(head, "sgd", lr=0.2, momentum=0.9)


def _resume(rank, world, folder):
    """World 2 trains two steps, saves, takes a third; world 3 and one process load the
    checkpoint and take the third step: (loss, statistics) of each."""
    import torch.distributed.checkpoint as dcp

    groups = {1: dist.new_group([0]), 2: dist.new_group([0, 1]), 3: dist.group.WORLD}
    out = {}
    for margin_type, k in RESUMED:
        path = f"{folder}/{margin_type}"
        if rank < 2:
            head, opt = _fresh(margin_type, k, groups[2], seed=1)
            for step in (0, 1):
                _train_step(head, opt, rank, 2, step)
            run_dcp(dcp.save, {"c": _state(head, opt, groups[2])}, groups[2],
                    storage_writer=dcp.FileSystemWriter(path))  # fmt: skip
            out[(margin_type, 2)] = (_train_step(head, opt, rank, 2, 2), _stats(head))
        dist.barrier()
        for size in (3, 1):
            if rank >= size:
                continue
            group = groups[size]
            head, opt = _fresh(margin_type, k, group, seed=2)  # other rows: the load matters
            state = _state(head, opt, group)
            tree = {"c": state.state_dict()}
            run_dcp(dcp.load, tree, group, storage_reader=dcp.FileSystemReader(path))
            state.load_state_dict(tree["c"])
            out[(margin_type, size)] = (_train_step(head, opt, rank, size, 2), _stats(head))
        dist.barrier()
    return out


def _stats(head):
    return {name: float(v) for name, v in head.margin_state.stats.items()}


def _ranks(rank, world, folder):
    per_world = {}
    for size in (1, 2, 3):  # explicit groups of the first ranks (the head refuses None here)
        group = dist.new_group(list(range(size))) if size < world else dist.group.WORLD
        if rank < size:
            per_world[size] = _per_world(rank, size, group)
    return per_world, _resume(rank, world, folder)


@pytest.mark.multiproc
def test_margins_and_subcenters_at_1_2_3_ranks_match_reference_and_resume(tmp_path):
    results = run_ranks(3, _ranks, str(tmp_path), timeout_s=300)
    per_world = {}
    for worlds, _ in results:
        for size, res in worlds.items():
            per_world.setdefault(size, []).append(res)
    # running statistics: bit-for-bit the same at every world size and on every rank
    reference_stats = per_world[1][0]["stats"]
    assert any(reference_stats), "no case kept running statistics"
    for size, ranks in per_world.items():
        for res in ranks:
            assert res["stats"] == reference_stats, f"world {size}"
    # collectives: 2 all-reduces (CurricularFace: 3), 5 (6) forward collectives, one
    # reduce-scatter backward
    for size, ranks in per_world.items():
        for (margin_type, _), (reduces, total, backward) in ranks[0]["counts"].items():
            extra = margin_type == "curricularface"
            assert (reduces, total) == (2 + extra, 5 + extra), (size, margin_type)
            assert len(backward) == 1 and backward[0].startswith("reduce_scatter"), backward
    # sub-center rows initialised independently of the world size (class-major blocks)
    full = {}
    for size, ranks in per_world.items():
        parts = sorted(r["init"] for r in ranks)
        full[size] = np.concatenate([rows for _, rows in parts])
    for size in (2, 3):
        np.testing.assert_array_equal(full[size], full[1])
    # resume: the next loss and statistics after loading on 3 ranks / 1 process equal the
    # uninterrupted world-2 run's
    resumed = {}
    for _, out in results:
        for key, value in out.items():
            resumed.setdefault(key, []).append(value)
    for margin_type, _ in RESUMED:
        want_loss, want_stats = resumed[(margin_type, 2)][0]
        for size in (1, 3):
            for loss, stats in resumed[(margin_type, size)]:
                assert math.isclose(loss, want_loss, rel_tol=1e-12), (margin_type, size)
                assert stats == want_stats, (margin_type, size)
