"""``train.compile``: the backbone compiled for training gives the eager losses, eager
evaluation, and checkpoints interchangeable with eager runs (1 process and 2 gloo ranks).

Most runs use the ``aot_eager`` backend: dynamo and AOTAutograd trace the backbone exactly as
for inductor but run the traced aten ops as they are, so the wiring (the compiled wrapper
inside DDP, DeepSpeed's in-place compile, accumulation, activation checkpointing, checkpoints,
evaluation) is checked against eager at a few ulp. One run compiles
for real with inductor (C++ kernels on the CPU), on a small conv net that inductor builds in
seconds (MobileFaceNet takes minutes on a loaded 2-core machine: tools/bench_compile.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_cosface.cli import describe_failure
from dist_cosface.configtools import ConfigError
from dist_cosface.distributed import DistContext, context_from_group
from dist_cosface.engine import train
from dist_cosface.engine.builders import seed_everything
from dist_cosface.engine.checkpoint.reader import read_tree
from dist_cosface.engine.strategy import CompilerUnavailable, build_strategy
from dist_cosface.eval.bin_file import write_bin
from tests.eval_sets import png_bytes
from tests.multiproc import run_ranks
from tests.tiny import DS_COMPARE_OVERRIDES, FixedLoader, fixed_batches, tiny_config

# aot_eager runs eager's own aten kernels on the traced graph: any difference is a few ulp of
# re-associated elementwise work, far below one training step's change of the loss
AOT_RTOL = 1e-6
# inductor fuses and re-orders fp32 reductions (BatchNorm statistics, the conv backward):
# over 3 SGD steps of this well-conditioned net the losses differed from eager by 1.5e-7
# relative here; 1e-5 leaves room for other CPUs' vector widths, while a wrong gradient or
# update moves a loss by more than 1e-2
INDUCTOR_RTOL = 1e-5
AOT = ("train.compile=true", "train.compile_backend=aot_eager")


def _reset_dynamo() -> None:
    """Forget compiled graphs and dynamo's counters (``reset`` keeps the counters)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own modules from scratch (no graphs or counters carried over)."""
    _reset_dynamo()
    yield
    _reset_dynamo()


class SmallNet(nn.Module):
    """A stem (conv, BatchNorm, PReLU), a residual conv block run under non-reentrant
    activation checkpointing when asked, and a linear layer to 16-d: 32 px inputs."""

    def __init__(self, checkpointing: bool = False) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8)
        )
        # no BatchNorm in the checkpointed block: its recomputation would update the running
        # statistics a second time in eager mode only
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.PReLU(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 16 * 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.checkpointing:
            return self.head(x + checkpoint(self.block, x, use_reentrant=False))
        return self.head(x + self.block(x))


def _losses(out: str | Path) -> list[float]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [rec["loss"] for rec in map(json.loads, lines) if "loss" in rec]


def _train_small(out, ctx, *overrides, checkpointing=False, steps=3) -> list[float]:
    """Train SmallNet (seeded by train.seed) on fixed batches; returns the logged losses."""
    cfg = tiny_config(out, f"train.total_steps={steps}", *overrides)
    seed_everything(cfg.train.seed)
    backbone = SmallNet(checkpointing)
    loader = FixedLoader(fixed_batches(4, cfg.data.batch_size, seed=ctx.rank), 8)
    train(cfg, ctx, backbone=backbone, loader=loader)
    return _losses(out)


# ---- config and start-up checks ------------------------------------------------------------


def test_compile_keys_are_validated():
    with pytest.raises(ConfigError, match="train.compile_mode 'max-autotune' needs"):
        tiny_config(
            "x",
            "train.compile=true",
            "train.compile_backend=aot_eager",
            "train.compile_mode=max-autotune",
        )
    with pytest.raises(ConfigError, match="train.compile_backend"):
        tiny_config("x", "train.compile_backend=tvm")
    with pytest.raises(ConfigError, match="train.compile_mode"):
        tiny_config("x", "train.compile_mode=fast")


def test_missing_cxx_compiler_fails_at_start_in_one_line(tmp_path):
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    # torch's own config patch, not pytest's monkeypatch: undoing a monkeypatch of a torch
    # config entry deletes it under some pytest versions (seen with 9.2), breaking later tests
    missing = {"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}
    cpp_compiler_search.cache_clear()  # inductor remembers the compiler it found
    out = tmp_path / "run"
    try:
        with inductor_config.patch(missing), pytest.raises(CompilerUnavailable) as err:
            train(tiny_config(out, "train.compile=true"), DistContext())
    finally:
        cpp_compiler_search.cache_clear()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train.compile=true: torch.compile(backend='inductor')")
    assert "InvalidCxxCompiler" in message and "train.compile=false" in message
    assert not out.exists()  # refused before the run folder is created
    status, line = describe_failure(err.value)  # the CLI's rendering: a known failure
    assert status == 1 and line == f"error: {message}"


def test_deepspeed_refuses_a_backbone_torch_would_not_compile(tmp_path):
    cfg = tiny_config(tmp_path, "train.engine=deepspeed", *AOT)
    with pytest.raises(ValueError, match=r"torch skips for a forward of its own \(Sequential"):
        build_strategy(cfg, DistContext(), nn.Sequential(nn.Flatten(), nn.Linear(3072, 16)))


# ---- one process ---------------------------------------------------------------------------


def test_inductor_training_gives_the_eager_losses(tmp_path, one_thread):
    ctx = DistContext()
    eager = _train_small(tmp_path / "eager", ctx)
    compiled = _train_small(tmp_path / "inductor", ctx, "train.compile=true")
    assert len(eager) == 3
    np.testing.assert_allclose(compiled, eager, rtol=INDUCTOR_RTOL)


def _eval_overrides(folder: Path) -> tuple[str, ...]:
    """Evaluate on a 4-pair .bin of random 32 px images after every step."""
    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    target = write_bin(folder / "tiny.bin", images, [True, False, True, False])
    return (
        f"eval.targets=[{target}]",
        "eval.every_steps=1",
        "eval.roc_png=false",
        "eval.batch_size=4",
        "eval.n_folds=2",
    )


def test_checkpoints_move_between_compiled_and_eager_runs(tmp_path, one_thread):
    """Eager 4 steps (C); compiled 2 steps (A) resumed eagerly (B); C's step 2 resumed
    compiled (D). Every run logs C's losses; the compiled runs evaluate eagerly."""
    evals, ctx = _eval_overrides(tmp_path), DistContext()

    def run(name, steps, *overrides):
        every = "checkpoint.every_steps=2"
        return _train_small(tmp_path / name, ctx, every, *overrides, steps=steps)

    def compiled_graphs():
        """Graphs since the last reset: the start-up probe's, then the backbone's."""
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    c = run("c", 4, *evals)
    a = run("a", 2, *evals, *AOT)  # evaluates after step 1, then trains on compiled
    # evaluation ran eagerly, and the backbone is one graph
    assert compiled_graphs() == 2, "a graph break, or evaluation was compiled"
    np.testing.assert_allclose(a, c[:2], rtol=AOT_RTOL)

    # the compiled run's checkpoint holds the eager run's names (what eval and export load)
    a_ckpt, c_ckpt = (tmp_path / n / "checkpoints" / "step_2" for n in ("a", "c"))
    a_tree, c_tree = read_tree(a_ckpt, "backbone"), read_tree(c_ckpt, "backbone")
    assert sorted(a_tree) == sorted(c_tree) and not [k for k in a_tree if "_orig_mod" in k]
    for key, value in c_tree.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(a_tree[key], value, rtol=AOT_RTOL, atol=1e-7, msg=key)

    b = run("b", 4, f"checkpoint.resume={a_ckpt}")
    _reset_dynamo()
    d = run("d", 4, f"checkpoint.resume={c_ckpt}", *evals, *AOT)
    assert compiled_graphs() == 2
    np.testing.assert_allclose(b, c[2:], rtol=AOT_RTOL)  # steps 3 and 4
    np.testing.assert_allclose(d, c[2:], rtol=AOT_RTOL)
    # the compiled run's evaluation after step 4 is the eager run's
    c_eval, d_eval = (json.loads((tmp_path / n / "eval.json").read_text()) for n in "cd")
    assert d_eval == c_eval


# ---- two gloo ranks ------------------------------------------------------------------------


def _two_rank_runs(rank, world, out, evals):
    """Eager DDP, compiled DDP and compiled DeepSpeed ZeRO-1 (accumulation 2, checkpointed
    block): ZeRO-1 reduces the accumulated gradients once per step, exactly as DDP does."""
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    ds = ("train.engine=deepspeed", "train.zero_stage=1")
    runs, graphs = {}, {}
    # DeepSpeed compiles in place: its evaluation must run eagerly
    for name, overrides in {
        "ddp": (),
        "ddp_compiled": AOT,
        "ds_compiled": (*ds, *AOT, *evals),
    }.items():
        _reset_dynamo()
        overrides = (*DS_COMPARE_OVERRIDES, *overrides)
        runs[name] = _train_small(f"{out}/{name}", ctx, *overrides, checkpointing=True)
        graphs[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return runs, graphs


@pytest.mark.multiproc
def test_two_ranks_compiled_ddp_and_deepspeed_give_the_eager_losses(tmp_path):
    pytest.importorskip("deepspeed")
    evals = _eval_overrides(tmp_path)
    env = {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": os.environ.get("DS_BUILD_OPS", "0")}
    for runs, graphs in run_ranks(2, _two_rank_runs, str(tmp_path), evals, env=env):
        assert len(runs["ddp"]) == 3
        for name in ("ddp_compiled", "ds_compiled"):
            np.testing.assert_allclose(runs[name], runs["ddp"], rtol=AOT_RTOL, err_msg=name)
        # the start-up probe's graph and the training forward's (DeepSpeed's evaluation ran
        # eagerly; the checkpointed block stays inside the one graph)
        assert graphs == {"ddp": 0, "ddp_compiled": 2, "ds_compiled": 2}
