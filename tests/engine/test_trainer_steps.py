"""Training engine: schedule, global grad norm, accumulation, and 2-rank training against a
float64 single-process reference (same init seed, same global batches)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_cosface.classifier import ShardedClassifier
from dist_cosface.distributed import DistContext, context_from_group
from dist_cosface.engine import train
from dist_cosface.engine.builders import seed_everything
from dist_cosface.engine.checkpoint.reader import read_value
from dist_cosface.engine.config import OptimConfig
from dist_cosface.engine.grad_norm import clip_grads_, global_grad_norm_and_votes
from dist_cosface.engine.lr_schedule import lr_at
from dist_cosface.models import build_backbone
from dist_cosface.sharding import mark_sharded
from tests.multiproc import run_ranks
from tests.tiny import FixedLoader, fixed_batches, linear_backbone, tiny_config

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _world_ctx() -> DistContext:
    return context_from_group(dist.group.WORLD, CPU)


# ---------------------------------------------------------------- schedule and norms


def test_lr_schedule_warmup_then_decay():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr=0.1)
    assert [lr_at(cfg, s, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 4, 20) == pytest.approx(1.0)
    assert lr_at(cfg, 12, 20) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through decay
    assert lr_at(cfg, 20, 20) == pytest.approx(0.1)
    poly = OptimConfig(lr=1.0, schedule="poly", poly_power=2.0)
    assert lr_at(poly, 5, 10) == pytest.approx(0.25)
    assert lr_at(OptimConfig(lr=0.3, schedule="constant"), 7, 10) == 0.3


def _votes(*values: float) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def test_grad_norm_single_process_and_clip():
    a, b = torch.nn.Parameter(torch.zeros(3)), mark_sharded(torch.nn.Parameter(torch.zeros(2)))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    norm, flags = global_grad_norm_and_votes([a, b], DistContext(), _votes(1.0))
    assert norm == pytest.approx(5.0) and flags == [1.0]
    clip_grads_([a, b], norm, 1.0)
    assert math.hypot(*a.grad.tolist(), *b.grad.tolist()) == pytest.approx(1.0, rel=1e-5)


def _norm_ranks(rank, world, full_sharded, replicated_grad, flag_rank):
    rows = full_sharded.chunk(world)[rank]
    shard = mark_sharded(torch.nn.Parameter(torch.zeros_like(rows)))
    shard.grad = rows.clone()
    rep = torch.nn.Parameter(torch.zeros_like(replicated_grad))
    rep.grad = replicated_grad.clone()  # identical on every rank, as after DDP averaging
    return global_grad_norm_and_votes([rep, shard], _world_ctx(), _votes(rank == flag_rank))


@pytest.mark.multiproc
def test_grad_norm_counts_each_shard_once_on_three_ranks():
    full, rep = torch.randn(9, 5), torch.randn(7)
    expected = torch.cat([full.flatten(), rep]).norm().item()  # single-process norm
    results = run_ranks(3, _norm_ranks, full, rep, 2)
    for norm, flags in results:
        assert norm == pytest.approx(expected, rel=1e-6)
        assert flags == [1.0]  # one rank's SIGTERM vote reaches every rank
    assert len({r[0] for r in results}) == 1  # bit-identical on all ranks


# ---------------------------------------------------------------- single process behaviour


def _train_fixed(tmp, batches, *overrides):
    cfg = tiny_config(tmp, "optim.grad_clip=0.5", *overrides)
    backbone = linear_backbone(cfg)
    out = train(cfg, DistContext(), backbone=backbone, loader=FixedLoader(batches, 8))
    ckpt = Path(out.checkpoint)
    return out, backbone, read_value(ckpt, "classifier.weight")


def test_grad_accumulation_equals_larger_batch(tmp_path):
    big = fixed_batches(3, 8)
    halves = [(x[i : i + 4], y[i : i + 4]) for x, y in big for i in (0, 4)]
    out1, bb1, head1 = _train_fixed(tmp_path / "a", big, "data.batch_size=8")
    out2, bb2, head2 = _train_fixed(tmp_path / "b", halves, "optim.grad_accum_steps=2")
    assert out1.loss == pytest.approx(out2.loss, rel=1e-5)
    for p1, p2 in zip(bb1.parameters(), bb2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head1, head2, rtol=1e-5, atol=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert {"step", "time", "samples_per_s", "loss", "lr", "grad_norm"} <= set(lines[0])
    assert (tmp_path / "a" / "config.yaml").is_file()


def test_non_finite_loss_stops_naming_the_step(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="dist_cosface")
    batches = fixed_batches(3, 4)
    batches[1][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 1"):
        _train_fixed(tmp_path, batches)
    # the failing rank logs who it is (DEBUG: the CLI prints the one-line error)
    assert "rank 0: training failed" in caplog.text


def test_fp16_overflow_skips_step_and_lowers_scale(tmp_path):
    batches = fixed_batches(10, 4)
    batches[0][0][0, 0, 0, 0] = float("inf")  # overflowing steps are skipped, not fatal
    out, _, _ = _train_fixed(tmp_path, batches, "train.precision=fp16")
    assert out.step == 3 and math.isfinite(out.loss)
    ckpt = Path(out.checkpoint)
    scale = read_value(ckpt, "scaler.scale")
    skips = read_value(ckpt, "rank0.loader.batches_consumed") - 3  # a skip consumed one batch
    assert skips >= 1 and scale == 2.0**16 / 2**skips
    with pytest.raises(FloatingPointError, match="consecutive fp16 overflow"):
        _train_fixed(tmp_path / "x", batches, "train.precision=fp16", "train.max_skipped_steps=1")


def test_bf16_autocast_trains(tmp_path):
    out, _, head = _train_fixed(
        tmp_path, fixed_batches(3, 4), "train.precision=bf16", "optim.name=adamw"
    )
    assert out.step == 3 and math.isfinite(out.loss) and head.dtype == torch.float32


def test_mismatched_sizes_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model.input_size"):
        train(tiny_config(tmp_path, "data.image_size=48"), DistContext())
    with pytest.raises(ValueError, match="classifier.num_classes=9"):
        train(tiny_config(tmp_path, "classifier.num_classes=9"), DistContext())


# ---------------------------------------------------------------- 2 ranks vs float64 reference


def _train_two_ranks(rank, world, out):
    from dist_cosface.models import build_backbone

    cfg = tiny_config(out, *_REF_OVERRIDES)
    seed_everything(cfg.train.seed)
    backbone = build_backbone(cfg.model)
    summary = train(cfg, _world_ctx(), backbone=backbone)
    # numpy: torch tensors would travel as shared-memory handles that die with the rank
    weights = {k: v.detach().numpy().copy() for k, v in backbone.named_parameters()}
    return summary, weights


# accumulation, active clipping (gradient norms are ~10-1000) and weight decay all in play
_REF_OVERRIDES = (
    "optim.grad_accum_steps=2",
    "optim.grad_clip=2.0",
    "optim.weight_decay=0.01",
    "data.batch_size=8",
    "data.synthetic_samples_per_class=16",
    "classifier.scale=8.0",
    "optim.lr=0.02",
)


def _assert_tracks_reference(got, ref, init, what):
    """fp32 training vs the float64 reference: close relative to how far training moved.

    Plain fp32 rounding already moves a 3-step run with 8-sample BatchNorm by ~4% of the
    update against float64 (an fp32 single-process run does the same); a wrong gradient
    scale, missing clipping or weight decay would be off by O(100%).
    """
    moved = (ref - init).abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= 0.1 * moved + 1e-6, f"{what}: error {err:.3g} vs update size {moved:.3g}"


def _cosface_loss(emb, weight, labels, scale, margin):
    cos = F.normalize(emb) @ F.normalize(weight).T
    cos = cos - margin * F.one_hot(labels, weight.shape[0]).to(cos.dtype)
    return F.cross_entropy(scale * cos, labels)


def _reference_run(out, world, dtype=torch.float64):
    """Float64 single process on the same global batches: per-rank parts go through the
    backbone separately (per-rank BatchNorm statistics, as under DDP)."""
    from dist_cosface.classifier import ShardedClassifier
    from dist_cosface.data.synthetic import SyntheticLoader
    from dist_cosface.models import build_backbone

    cfg = tiny_config(out, *_REF_OVERRIDES)
    seed_everything(cfg.train.seed)
    backbone = build_backbone(cfg.model).to(dtype)
    head = ShardedClassifier(cfg.classifier, cfg.model.embedding_size, None)
    head.reset_parameters(seed=cfg.train.seed)
    weight = torch.nn.Parameter(head.weight.detach().to(dtype).clone())
    params = list(backbone.parameters()) + [weight]
    bufs = [torch.zeros_like(p) for p in params]
    loaders = [
        SyntheticLoader(cfg.data, DistContext(rank=r, world_size=world)) for r in range(world)
    ]
    streams = [iter(ld) for ld in loaders]
    o, accum, losses = cfg.optim, cfg.optim.grad_accum_steps, []
    for step in range(cfg.train.total_steps):
        step_loss = 0.0
        for _ in range(accum):
            batches = [next(s) for s in streams]
            emb = torch.cat([backbone(x.to(dtype)) for x, _ in batches])
            labels = torch.cat([y for _, y in batches])
            loss = _cosface_loss(emb, weight, labels, cfg.classifier.scale, cfg.classifier.margin)
            (loss / accum).backward()
            step_loss += loss.item() / accum
        losses.append(step_loss)
        norm = torch.cat([p.grad.flatten() for p in params]).norm().item()
        coef = min(1.0, o.grad_clip / (norm + 1e-6))
        lr = lr_at(o, step, cfg.train.total_steps)
        with torch.no_grad():
            for p, buf in zip(params, bufs):
                grad = p.grad * coef + o.weight_decay * p
                buf.mul_(o.momentum).add_(grad)
                p.sub_(lr * buf)
                p.grad = None
    return losses, dict(backbone.named_parameters()), weight.detach()


@pytest.mark.multiproc
def test_two_ranks_match_float64_reference(tmp_path):
    results = run_ranks(2, _train_two_ranks, str(tmp_path / "run"))
    ref_losses, ref_backbone, ref_weight = _reference_run(tmp_path / "ref", 2)
    (sum0, w0), (sum1, w1) = results
    w0, w1 = ({k: torch.from_numpy(v) for k, v in w.items()} for w in (w0, w1))
    cfg = tiny_config(tmp_path / "init", *_REF_OVERRIDES)
    seed_everything(cfg.train.seed)
    init = {k: v.detach().double() for k, v in build_backbone(cfg.model).named_parameters()}
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"backbone {name} differs between ranks"
        _assert_tracks_reference(w0[name], ref_backbone[name].detach(), init[name], name)
    ckpt = Path(sum0.checkpoint)
    assert json.loads((ckpt / "meta.json").read_text())["class_layout"] == [[0, 4], [4, 4]]
    full = read_value(ckpt, "classifier.weight")  # both ranks' rows, as one [8, D] tensor
    assert not torch.equal(full[:4], full[4:])
    head = ShardedClassifier(cfg.classifier, cfg.model.embedding_size, None)
    head.reset_parameters(seed=cfg.train.seed)
    _assert_tracks_reference(full, ref_weight, head.weight.detach().double(), "classifier")
    assert sum0.loss == pytest.approx(ref_losses[-1], rel=1e-3)
    assert sum1.loss == sum0.loss


def test_evaluation_during_and_after_training(tmp_path):
    import io

    from PIL import Image

    from dist_cosface.eval import write_bin

    rng = np.random.default_rng(0)
    images = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    target = write_bin(tmp_path / "tiny.bin", images, [True, False, True, False])
    out, _, _ = _train_fixed(
        tmp_path / "run",
        fixed_batches(3, 4),
        f"eval.targets=[{target}]",
        "eval.every_steps=2",
        "eval.roc_png=false",
        "eval.batch_size=4",
        "eval.n_folds=2",
    )
    assert set(out.eval) == {"tiny"} and 0.0 <= out.eval["tiny"]["accuracy"] <= 1.0
    assert (tmp_path / "run" / "eval.json").is_file()
