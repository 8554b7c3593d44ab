"""Training-step time with ``train.compile: true`` against eager, per backbone, on the CPU.

Each model is built twice from the same seed with the trainer's own pieces (``build_strategy``
with and without ``train.compile``, the sharded head, SGD); one step is forward, the CosFace
loss, backward and both optimizers on a fixed batch. The start-up compiler check and the
compiled model's first step (compilation) are timed on their own; then eager and
compiled steps alternate, so that a shared machine's load falls on both alike; the ratio is
the median over those pairs of compiled / eager step time. Inductor compiles into a fresh
temporary cache unless ``--warm-cache``, so the compile figure is that of a first run.
Prints the load average before and after.
    PYTHONPATH=. python tools/bench_compile.py --models mobilefacenet,iresnet50 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_cosface.config import RunConfig, load_config
from dist_cosface.distributed import DistContext
from dist_cosface.engine.builders import build_head_and_optimizer, seed_everything
from dist_cosface.engine.strategy import build_strategy, check_compiler
from dist_cosface.models import build_backbone


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="mobilefacenet,iresnet50")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (alternating)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--backend", choices=["inductor", "aot_eager"], default="inductor")
    p.add_argument("--mode", default="default", help="train.compile_mode")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="use inductor's usual cache (default: a fresh one)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if min(args.batch, args.steps, args.num_classes, args.threads) < 1 or args.warmup < 0:
        p.error("--batch, --steps, --num-classes and --threads must be positive")
    return args


class Run:
    """One model's training step built from the trainer's parts (compiled or eager)."""

    def __init__(self, args: argparse.Namespace, model: str, compiled: bool) -> None:
        self.cfg = run_config(args, model, compiled)
        ctx = DistContext()
        seed_everything(0)
        backbone = build_backbone(self.cfg.model)
        self.head, self.head_optim = build_head_and_optimizer(self.cfg, ctx)
        self.strategy = build_strategy(self.cfg, ctx, backbone)
        self.strategy.backbone.train()
        self.step_count = 0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Seconds of one training step."""
        start = time.perf_counter()
        self.head.begin_step(self.step_count)
        with self.strategy.autocast():
            loss = self.head(self.strategy.model(images), labels)
        self.strategy.backward(loss, True)
        self.head_optim.step()
        self.head_optim.zero_grad(set_to_none=True)
        self.strategy.step()
        self.step_count += 1
        return time.perf_counter() - start


def run_config(args: argparse.Namespace, model: str, compiled: bool) -> RunConfig:
    return load_config(
        None,
        [
            f"model.name={model}",
            f"model.input_size={args.image_size}",
            f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch}",
            f"classifier.num_classes={args.num_classes}",
            f"train.compile={str(compiled).lower()}",
            f"train.compile_backend={args.backend}",
            f"train.compile_mode={args.mode}",
        ],
    )


def measure(args: argparse.Namespace, model: str) -> dict:
    """Compile time, median eager and compiled step times and dynamo's graph count."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.image_size, args.image_size)
    images = torch.rand(shape, generator=gen) * 2 - 1
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen)
    eager, compiled = Run(args, model, False), Run(args, model, True)
    eager.step(images, labels)  # first-call allocations, like the compiled warm-up
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    check_compiler(compiled.cfg.train, torch.device("cpu"))  # what a run does at start-up
    check_s = time.perf_counter() - start
    graphs = -int(torch._dynamo.utils.counters["stats"]["unique_graphs"])  # the check's own
    first_step_s = compiled.step(images, labels)  # compiles
    graphs += int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    for _ in range(args.warmup):
        eager.step(images, labels)
        compiled.step(images, labels)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.steps):
        times["eager"].append(eager.step(images, labels))
        times["compiled"].append(compiled.step(images, labels))
    eager_s = statistics.median(times["eager"])
    compiled_s = statistics.median(times["compiled"])
    pairs = [c / e for e, c in zip(times["eager"], times["compiled"])]
    return {
        "eager_step_s": eager_s,
        "compiled_step_s": compiled_s,
        "ratio": statistics.median(pairs),
        "ratio_range": [min(pairs), max(pairs)],
        "check_s": check_s,  # the start-up compiler check
        "compile_s": first_step_s - compiled_s,  # the first compiled step less one step
        "graphs": graphs,
        "graph_breaks": breaks,
        "eager_steps_s": times["eager"],
        "compiled_steps_s": times["compiled"],
    }


def measure_or_error(args: argparse.Namespace, model: str) -> dict:
    try:
        return measure(args, model)
    except Exception as exc:  # noqa: BLE001 - one failing model must not hide the others
        return {"error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_compile_") as cache:
        if not args.warm_cache:  # read by inductor when it compiles, not at import
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        rows = {model: measure_or_error(args, model) for model in args.models}
    load_after = os.getloadavg()
    print(
        f"CPU, {args.threads} thread(s), {args.image_size}px batch={args.batch} "
        f"C={args.num_classes} fp32, backend={args.backend} mode={args.mode}"
    )
    print(
        f"{'model':<14}{'eager':>10}{'compiled':>10}{'ratio':>8}{'(range)':>13}"
        f"{'compile':>10}{'check':>8}  graphs"
    )
    for model, row in rows.items():
        if "error" in row:
            print(f"{model:<14}FAILED {row['error']}")
            continue
        print(
            f"{model:<14}{row['eager_step_s'] * 1e3:>8.0f}ms{row['compiled_step_s'] * 1e3:>8.0f}ms"
            f"{row['ratio']:>8.2f}  ({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f})"
            f"{row['compile_s']:>9.1f}s{row['check_s']:>7.1f}s  {row['graphs']}"
            f" ({row['graph_breaks']} breaks)"
        )
    print(
        "eager, compiled: median step times; ratio: median over adjacent pairs of compiled / "
        "eager (< 1: compiled is faster); compile: the first compiled step less a step "
        f"({'warm' if args.warm_cache else 'fresh'} inductor cache); check: the start-up "
        "compiler check"
    )
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.1f}" for x in load_before)
        + "; after "
        + ", ".join(f"{x:.1f}" for x in load_after)
    )
    if args.json:
        out = {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "load_before": load_before,
            "load_after": load_after,
            "models": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
