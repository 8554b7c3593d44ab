"""How far one ulp moves the 2-step run of tests/engine/test_trainer_deepspeed.py.

For each seed, on the test's tiny model and settings: DDP (the reference), DDP whose initial
backbone weights were each moved by one ulp (x (1 +- 2^-23)), and DeepSpeed ZeRO 2, which
reduces every micro-batch and so rounds differently from DDP. Prints the largest backbone
weight difference to the reference after 2 steps and the share of weights outside the test's
tolerance (rtol 1e-4, atol 1e-5). Run from the repository root:

    DS_ACCELERATOR=cpu PYTHONPATH=$PWD torchrun --nproc-per-node 2 \\
        tools/ds_rounding_check.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from dist_cosface.distributed import DistConfig, init_distributed, shutdown
from dist_cosface.engine import train
from dist_cosface.engine.builders import seed_everything
from dist_cosface.models import build_backbone
from tests.tiny import DS_COMPARE_OVERRIDES, tiny_config


def _train(engine: str, zero_stage: int, out: str, seed: int, ulp_sign_seed: int | None, ctx):
    cfg = tiny_config(
        out,
        *DS_COMPARE_OVERRIDES,
        "train.total_steps=2",
        f"train.seed={seed}",
        f"train.engine={engine}",
        f"train.zero_stage={zero_stage}",
    )
    seed_everything(cfg.train.seed)
    backbone = build_backbone(cfg.model)
    if ulp_sign_seed is not None:
        gen = torch.Generator().manual_seed(ulp_sign_seed)
        with torch.no_grad():
            for p in backbone.parameters():
                sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                p.mul_(1 + sign * 2.0**-23)
    train(cfg, ctx, backbone=backbone)
    return {k: v.detach().clone() for k, v in backbone.named_parameters()}


def _difference(run: dict, reference: dict) -> tuple[float, float]:
    """(largest absolute difference, share of elements outside rtol 1e-4 / atol 1e-5)."""
    worst, outside, total = 0.0, 0, 0
    for name, ref in reference.items():
        diff = (run[name] - ref).abs()
        worst = max(worst, float(diff.max()))
        outside += int((diff > 1e-5 + 1e-4 * ref.abs()).sum())
        total += ref.numel()
    return worst, outside / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the test's ranks
    ctx = init_distributed(DistConfig(backend="gloo", device="cpu"))
    try:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                out = tmp if ctx.rank == 0 else None
                folder = [out]
                torch.distributed.broadcast_object_list(folder, src=0, group=ctx.group)
                ref = _train("ddp", 0, f"{folder[0]}/ddp", seed, None, ctx)
                ulp = _train("ddp", 0, f"{folder[0]}/ulp", seed, 1, ctx)
                zero2 = _train("deepspeed", 2, f"{folder[0]}/zero2", seed, None, ctx)
                torch.distributed.barrier(group=ctx.group)
            if ctx.rank == 0:
                for label, run in (("DDP, initial weights +-1 ulp", ulp), ("ZeRO 2", zero2)):
                    worst, share = _difference(run, ref)
                    print(
                        f"seed {seed}: {label:30s} max |diff| {worst:.2e}, "
                        f"{100 * share:.1f}% outside the test's tolerance",
                        flush=True,
                    )
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main()
