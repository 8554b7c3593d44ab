"""Per-rank memory of FSDP2 (``train.engine: fsdp``) against DDP, on 2 CPU ranks (gloo).

Each engine runs in its own spawn of ``--ranks`` processes (a process's peak RSS covers its
whole life), built from the trainer's own pieces (``build_backbone``, ``build_strategy``, the
sharded head) with AdamW, and trains ``--steps`` steps on a fixed batch. Rank 0 reports:

- parameters, gradients and optimizer state: the bytes of the tensors this rank holds (a
  DTensor's local piece under FSDP), counted after the last backward (gradients) and after
  the last step (parameters, optimizer state);
- RSS now and the process's peak RSS (``ru_maxrss``), and the RSS before the backbone was
  built (imports, the process group), so that ``peak - start`` is what the training added.

The ratios are FSDP / DDP of the same run (step seconds: the mean of the steps after the
first); the load average is printed before and after.
    PYTHONPATH=. python tools/bench_fsdp.py --model vit_l --batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout (tools.spawn)
    sys.path.insert(0, str(REPO))

from dist_cosface.config import load_config  # noqa: E402
from dist_cosface.distributed import context_from_group  # noqa: E402
from dist_cosface.engine.builders import build_head_and_optimizer, seed_everything  # noqa: E402
from dist_cosface.engine.strategy import build_strategy  # noqa: E402
from dist_cosface.models import build_backbone  # noqa: E402
from tools.spawn import run_ranks  # noqa: E402

MIB = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="vit_l")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4, help="per rank")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.ranks, args.num_classes) < 1:
        p.error("--batch, --steps, --ranks and --num-classes must be positive")
    return args


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds (a DTensor's local piece)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def measure(rank: int, world: int, args: argparse.Namespace, engine: str) -> dict:

    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            f"model.input_size={args.image_size}",
            f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch}",
            f"classifier.num_classes={args.num_classes}",
            "optim.name=adamw",
            "optim.lr=0.001",
            f"train.engine={engine}",
        ],
    )
    start_rss = rss_bytes()
    seed_everything(0)
    backbone = build_backbone(cfg.model)
    head, head_optim = build_head_and_optimizer(cfg, ctx)
    strategy = build_strategy(cfg, ctx, backbone)
    strategy.backbone.train()
    gen = torch.Generator().manual_seed(rank)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=gen) * 2 - 1
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen)
    started = time.perf_counter()
    for step in range(args.steps):
        if step == 1:  # the first step builds the optimizer state: timed from the second
            started = time.perf_counter()
        head.begin_step(step)
        with strategy.autocast():
            loss = head(strategy.model(images), labels)
        strategy.backward(loss, True)
        params = list(strategy.backbone.parameters())
        grad_bytes = local_bytes(p.grad for p in params if p.grad is not None)
        head_optim.step()
        head_optim.zero_grad(set_to_none=True)
        strategy.step()
    seconds = (time.perf_counter() - started) / max(args.steps - 1, 1)
    return {
        "param_bytes": local_bytes(strategy.backbone.parameters()),
        "grad_bytes": grad_bytes,
        "optim_bytes": local_bytes(optimizer_tensors(strategy.optimizers()[0])),
        "start_rss": start_rss,
        "rss": rss_bytes(),
        "peak_rss": peak_rss_bytes(),
        "step_s": seconds,
        "loss": loss.item(),
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load average before: {load_average()}", flush=True)
    results = {}
    for engine in ("ddp", "fsdp"):
        per_rank = run_ranks(args.ranks, measure, args, engine, timeout_s=3600)
        results[engine] = per_rank
        print(f"{engine}: rank 0 {json.dumps(per_rank[0])}", flush=True)
    print(f"load average after: {load_average()}")
    ddp, fsdp = results["ddp"][0], results["fsdp"][0]
    rows = [
        ("parameters", "param_bytes"),
        ("gradients", "grad_bytes"),
        ("optimizer state", "optim_bytes"),
        ("peak RSS", "peak_rss"),
        ("peak RSS - start RSS", None),
    ]
    summary = {}
    print(f"\n{args.model}, {args.ranks} ranks, batch {args.batch}/rank, AdamW (rank 0, MiB)")
    print(f"{'':<24}{'ddp':>10}{'fsdp':>10}{'fsdp/ddp':>10}")
    for label, key in rows:
        a = ddp[key] if key else ddp["peak_rss"] - ddp["start_rss"]
        b = fsdp[key] if key else fsdp["peak_rss"] - fsdp["start_rss"]
        summary[label] = {"ddp": a, "fsdp": b, "ratio": b / a}
        print(f"{label:<24}{a / MIB:>10.1f}{b / MIB:>10.1f}{b / a:>10.3f}")
    label, keys = "params + grads + optim", ("param_bytes", "grad_bytes", "optim_bytes")
    a, b = sum(ddp[k] for k in keys), sum(fsdp[k] for k in keys)
    summary[label] = {"ddp": a, "fsdp": b, "ratio": b / a}
    print(f"{label:<24}{a / MIB:>10.1f}{b / MIB:>10.1f}{b / a:>10.3f}")
    a, b = ddp["step_s"], fsdp["step_s"]
    summary["step seconds"] = {"ddp": a, "fsdp": b, "ratio": b / a}
    print(f"{'step seconds':<24}{a:>10.2f}{b:>10.2f}{b / a:>10.3f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": results, "summary": summary}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
