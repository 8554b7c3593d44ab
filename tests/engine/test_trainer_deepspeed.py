"""The DeepSpeed engine path gives the same training as the DDP path (fp32, 2 gloo ranks).

Every comparison is arranged so that both engines do the same arithmetic, or start the step
from the same weights: this tiny BatchNorm/PReLU network (4 samples per BatchNorm, first
step with a gradient norm of ~300-540) amplifies a 1-ulp weight difference after one step
into gradient differences of ~0.06-0.26 in the next (a PReLU input near zero changes sign),
so two engines that round differently cannot be compared after two steps (docs/training.md,
"DeepSpeed").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_cosface.classifier import class_range
from dist_cosface.distributed import context_from_group
from dist_cosface.engine import train
from dist_cosface.engine.builders import seed_everything
from dist_cosface.engine.checkpoint.reader import read_value
from tests.multiproc import run_ranks
from tests.tiny import DS_COMPARE_OVERRIDES, tiny_config

pytest.importorskip("deepspeed")

_OVERRIDES = DS_COMPARE_OVERRIDES


def _state(backbone: dict, head: torch.Tensor, loss: float, grad_norm: float) -> dict:
    return {"loss": loss, "grad_norm": grad_norm, "head": head.numpy().copy(), "backbone": backbone}


def _run(engine: str, zero_stage: int, out: str, precision="fp32", steps=2, keep_step_1=False):
    """Train ``steps`` steps; with ``keep_step_1`` also return the state after step 1."""
    from dist_cosface.models import build_backbone

    cfg = tiny_config(
        out,
        *_OVERRIDES,
        f"train.total_steps={steps}",
        f"train.engine={engine}",
        f"train.zero_stage={zero_stage}",
        f"train.precision={precision}",
        f"checkpoint.every_steps={1 if keep_step_1 else 0}",
    )
    seed_everything(cfg.train.seed)
    backbone = build_backbone(cfg.model)
    summary = train(
        cfg, context_from_group(dist.group.WORLD, torch.device("cpu")), backbone=backbone
    )
    start, count = class_range(cfg.classifier.num_classes, dist.get_world_size(), dist.get_rank())
    rows = slice(start, start + count)
    head = read_value(Path(summary.checkpoint), "classifier.weight")[rows]
    weights = {k: v.detach().float().numpy().copy() for k, v in backbone.named_parameters()}
    result = {"final": _state(weights, head, summary.loss, summary.grad_norm)}
    if keep_step_1:
        step_1 = Path(out) / "checkpoints" / "step_1"
        saved = {k: read_value(step_1, f"backbone.model.{k}") for k in weights}
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        log = next(r for r in map(json.loads, lines) if r.get("step") == 1 and "loss" in r)
        result["step_1"] = _state(
            {k: saved[k].float().numpy().copy() for k in weights},
            read_value(step_1, "classifier.weight")[rows],
            log["loss"],
            log["grad_norm"],
        )
    return result


def _compare_engines(rank, world, out):
    ddp = _run("ddp", 0, f"{out}/ddp", keep_step_1=True)
    # stages 0 and 1 all-reduce the accumulated gradients once per step, exactly as DDP:
    # the same arithmetic, compared after two steps (momentum and weight decay included)
    same_order = [_run("deepspeed", stage, f"{out}/ds{stage}")["final"] for stage in (0, 1)]
    # ZeRO 2 reduces every micro-batch as its gradients appear, (a1+b1)/2 + (a2+b2)/2 instead
    # of ((a1+a2) + (b1+b2))/2: compared after the step that starts from the same weights
    stage2 = _run("deepspeed", 2, f"{out}/ds2", steps=1)["final"]
    bf16 = _run("deepspeed", 1, f"{out}/ds1_bf16", precision="bf16")["final"]
    return ddp, same_order, stage2, bf16


def _assert_same(ds: dict, ddp: dict) -> None:
    assert ds["loss"] == pytest.approx(ddp["loss"], rel=1e-5)
    assert ds["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-4)
    torch.testing.assert_close(
        torch.from_numpy(ds["head"]), torch.from_numpy(ddp["head"]), rtol=1e-4, atol=1e-5
    )
    for name, value in ddp["backbone"].items():
        torch.testing.assert_close(
            torch.from_numpy(ds["backbone"][name]), torch.from_numpy(value), rtol=1e-4, atol=1e-5
        )


@pytest.mark.multiproc
@pytest.mark.slow
def test_deepspeed_matches_ddp(tmp_path):
    env = {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": os.environ.get("DS_BUILD_OPS", "0")}
    results = run_ranks(2, _compare_engines, str(tmp_path), env=env, timeout_s=400)
    for ddp, same_order, stage2, bf16 in results:
        for ds in same_order:
            _assert_same(ds, ddp["final"])
        _assert_same(stage2, ddp["step_1"])
        # bf16 weights and bf16 BatchNorm (ZeRO 1): a smoke check only, bf16 rounding through
        # 4-sample BatchNorm moves even the first loss by ~3%
        assert math.isfinite(bf16["loss"]) and math.isfinite(bf16["grad_norm"])


def _ds_resume(rank, world, out, steps):
    cfg = tiny_config(
        out,
        *_OVERRIDES,
        f"train.total_steps={steps}",
        "train.engine=deepspeed",
        "train.zero_stage=1",
        "checkpoint.every_steps=1",
    )
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    try:
        return train(cfg, ctx).resumed_from
    except ValueError as exc:
        return f"ValueError: {exc}"


@pytest.mark.multiproc
@pytest.mark.slow
def test_deepspeed_zero1_resumes_on_the_same_ranks_and_refuses_others(tmp_path):
    env = {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": os.environ.get("DS_BUILD_OPS", "0")}
    out = str(tmp_path / "run")
    assert run_ranks(2, _ds_resume, out, 1, env=env, timeout_s=300) == [None, None]
    resumed = run_ranks(2, _ds_resume, out, 2, env=env, timeout_s=300)
    assert all(r.endswith("step_1") for r in resumed)
    (refused,) = run_ranks(1, _ds_resume, out, 3, env=env, timeout_s=300)
    assert "ZeRO-1 checkpoint written by 2 ranks cannot resume on 1" in refused
