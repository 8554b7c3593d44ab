"""Peak memory of a CPU training step with and without ``model.activation_checkpointing``.

For each backbone, two fresh processes (plain, then checkpointed) build the model, an SGD
optimizer with momentum and a CosFace loss over ``--classes`` normalised class weights, take
one warm-up step (it creates the optimizer state), then measure one more step: its peak
resident memory above what the process held just before it (Linux ``VmHWM`` after resetting
it through ``/proc/self/clear_refs``), and its time. glibc's malloc is told to return every
block of 64 KiB or more to the system when freed, so resident memory follows live tensors.
The ratio checkpointed / plain of the peak growth is what checkpointing saves; the time
ratio is what the recomputation costs (on a shared CPU, record the load average with it).

  PYTHONPATH=. python tools/bench_activation_checkpointing.py [--models iresnet50 vit_b]
      [--batch 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_cosface.models import ModelConfig, build_backbone, count_parameters

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout (tools.bench_eval)
    sys.path.insert(0, str(REPO))

from tools.bench_eval import peak_bytes, reset_peak  # noqa: E402

MIB = 1024 * 1024


def _cosface_loss(embeddings, weight, labels, scale: float = 64.0, margin: float = 0.35):
    cos = F.normalize(embeddings) @ F.normalize(weight).T
    logits = scale * (cos - margin * F.one_hot(labels, weight.shape[0]))
    return F.cross_entropy(logits, labels)


def run_child(name: str, checkpointed: bool, batch: int, classes: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, activation_checkpointing=checkpointed)
    model = build_backbone(cfg).train()
    weight = torch.nn.Parameter(torch.randn(classes, cfg.embedding_size) * 0.01)
    optimizer = torch.optim.SGD([*model.parameters(), weight], lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, cfg.input_size, cfg.input_size)
    labels = torch.randint(0, classes, (batch,))

    def step() -> float:
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated between steps
        loss = _cosface_loss(model(images), weight, labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    step()
    gc.collect()
    before = reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return {
        "model": name,
        "checkpointed": checkpointed,
        "parameters": count_parameters(model),
        "resident_before_mib": before / MIB,
        "peak_growth_mib": (peak_bytes() - before) / MIB,
        "step_s": seconds,
    }


def measure(name: str, checkpointed: bool, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--child", name, str(int(checkpointed))]
    command += ["--batch", str(args.batch), "--classes", str(args.classes)]
    command += ["--threads", str(args.threads)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["iresnet50", "vit_b"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # MODEL 0|1
    args = parser.parse_args()
    if args.child:
        name, checkpointed = args.child[0], args.child[1] == "1"
        result = run_child(name, checkpointed, args.batch, args.classes, args.threads)
        print(json.dumps(result))
        return
    print(
        f"batch {args.batch} at 112x112, {args.classes} classes, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for name in args.models:
        plain = measure(name, False, args)
        ckpt = measure(name, True, args)
        memory = ckpt["peak_growth_mib"] / plain["peak_growth_mib"]
        speed = ckpt["step_s"] / plain["step_s"]
        print(
            f"{name:11s} {plain['parameters'] / 1e6:6.1f}M params | step peak growth "
            f"plain {plain['peak_growth_mib']:7.0f} MiB, checkpointed "
            f"{ckpt['peak_growth_mib']:7.0f} MiB: {memory:.2f}x | step time "
            f"{plain['step_s']:.1f} s vs {ckpt['step_s']:.1f} s: {speed:.2f}x"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
