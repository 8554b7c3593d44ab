"""End-to-end training samples/s on one GPU: backbone + sharded head + SGD, bf16 autocast.

Synthetic images already on the device (this measures compute, not data loading; see
tools/bench_data.py for the loaders). Variants are run one after another in the same
process and printed with their ratio against the first:
  eager          channels_last, bf16 autocast
  compile        the same with ``torch.compile`` of the backbone
    python tools/bench_train_gpu.py --model iresnet50 --batch 256 --num-classes 100000 \\
        --kernel auto --variants eager,compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from dist_cosface.classifier import ClassifierConfig, ShardedClassifier  # noqa: E402
from dist_cosface.models import ModelConfig, build_backbone  # noqa: E402

VARIANTS = ("eager", "compile")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="iresnet50")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=100_000)
    p.add_argument("--kernel", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation)")
    p.add_argument("--variants", default="eager,compile")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(VARIANTS) or not args.variants:
        p.error(f"--variants must name some of {list(VARIANTS)}")
    if min(args.batch, args.steps, args.warmup, args.num_classes) < 1:
        p.error("sizes, --steps and --warmup must be positive")
    return args


def samples_per_second(args: argparse.Namespace, variant: str) -> float:
    device = torch.device("cuda")
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(name=args.model, input_size=args.image_size))
    backbone = backbone.to(device, memory_format=torch.channels_last)
    head_cfg = ClassifierConfig(num_classes=args.num_classes, kernel=args.kernel)
    head = ShardedClassifier(head_cfg, 512, None).to(device)  # one process, no group
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    run = torch.compile(backbone) if variant == "compile" else backbone
    shape = (args.batch, 3, args.image_size, args.image_size)
    images = torch.randn(shape, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = head(run(images), labels)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 2
    rows: dict[str, dict] = {}
    for variant in args.variants:
        try:
            rows[variant] = {"samples_per_s": samples_per_second(args, variant)}
        except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others
            rows[variant] = {"error": f"{type(exc).__name__}: {exc}"}
    first = next((r["samples_per_s"] for r in rows.values() if "samples_per_s" in r), None)
    print(f"{args.model} {args.image_size}px batch={args.batch} bf16 channels_last")
    for variant, row in rows.items():
        if "error" in row:
            print(f"{variant:<10} FAILED {row['error']}")
            continue
        row["vs_first"] = row["samples_per_s"] / first
        print(f"{variant:<10}{row['samples_per_s']:>12.0f} samples/s  x{row['vs_first']:.2f}")
    if args.json:
        out = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "variants": rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if first is not None else 1


if __name__ == "__main__":
    sys.exit(main())
