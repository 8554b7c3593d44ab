"""``train.engine: fsdp``: FSDP2 trains like DDP, checkpoints through DCP and resumes exactly
on another rank count (2 -> 3 and 2 -> 1 gloo ranks), and eval/export read its checkpoints.

Two spawns (start-up is most of the time). 2 ranks: a DDP and an FSDP run of 3 steps (AdamW,
2 micro-batches per step, clipping active; FSDP with activation checkpointing and
``train.compile``, aot_eager), each saving step 2 and step 3. Then 3 ranks, and a group of
rank 0 alone in the same spawn: each resumes the FSDP run from step 2 for one step (eager: a
compiled run's checkpoint resumes in an eager one) beside a DDP reference, which resumes the
DDP run on 3 ranks and the FSDP checkpoint on 1 (the engines' checkpoints are
interchangeable). Not on 2 of the 3 ranks: successive runs on a 2-rank sub-group rebuild a
checkpoint group under the same name, which gloo then cannot connect. The model is a ViT
shaped like ``vit_t`` but 32 wide and 2 blocks deep (``VIT_SHAPES`` patched in every
process), at 32 px (9 tokens).

Tolerance FSDP vs DDP: the forward and the optimizer see the same numbers, but the gradient
average is reduced differently (DDP: all-reduce of flat buckets, then a division; FSDP:
reduce-scatter with torch's pre- and post-division factors, in another summation order on 3
ranks) and the clipping norm sums squared norms of shards instead of whole tensors; that moves
the last bits (1.4e-7 relative on the third step's loss here), while a wrong gradient, clip
or optimizer state moves a loss by more than 1e-3. Restored state is compared bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_cosface.configtools import ConfigError
from dist_cosface.distributed import context_from_group
from dist_cosface.engine import train
from dist_cosface.engine.checkpoint.reader import load_backbone, read_tree
from dist_cosface.engine.trainer import Trainer
from dist_cosface.models import config as model_config
from tests.multiproc import run_ranks
from tests.tiny import tiny_config

SMALL_VIT = model_config.ViTShape(width=32, depth=2, heads=4, drop_path_rate=0.1, mask_ratio=0.1)
RTOL = 1e-5
_OVERRIDES = (
    "model.name=vit_t",
    "optim.name=adamw",
    "optim.lr=0.001",
    "optim.grad_accum_steps=2",
    "checkpoint.every_steps=2",
)
_FSDP = ("train.engine=fsdp", "model.activation_checkpointing=true")
COMPILED = ("train.compile=true", "train.compile_backend=aot_eager")


def _small_vit() -> None:
    model_config.VIT_SHAPES["vit_t"] = SMALL_VIT  # this rank's process only


def _config(out: Path, engine: str, steps: int, resume: Path | None = None, *extra: str):
    overrides = [*_OVERRIDES, f"train.total_steps={steps}", *extra]
    overrides += list(_FSDP) if engine == "fsdp" else []
    if resume is not None:
        overrides.append(f"checkpoint.resume={resume}")
    return tiny_config(out, *overrides)


def _logged(out: Path, key: str = "loss") -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if "loss" in json.loads(line)]


def _step2(root: Path, engine: str) -> Path:
    return root / engine / "checkpoints" / "step_2"


def _train_two(rank, world, root):
    _small_vit()
    root = Path(root)
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    train(_config(root / "ddp", "ddp", 3), ctx)
    train(_config(root / "fsdp", "fsdp", 3, None, *COMPILED), ctx)


def _full(value) -> np.ndarray:
    value = value.full_tensor() if hasattr(value, "full_tensor") else value
    return value.detach().numpy().copy()


def _restored_fsdp(ctx, cfg, ckpt: Path) -> dict:
    """The backbone's weights and AdamW moments right after restoring ``ckpt`` (full tensors),
    and embeddings of rank-dependent batch counts from ``evaluation()`` (no collectives)."""
    parts = Trainer(cfg, ctx)
    try:
        parts.checkpointer.restore(ckpt, parts.state)
        backbone, optim = parts.strategy.backbone, parts.strategy.optimizers()[0]
        # FSDP shards the backbone only: the classifier keeps its own row sharding
        assert all(isinstance(p, DTensor) for p in backbone.parameters())
        assert not any(isinstance(p, DTensor) for p in parts.head.parameters())
        out = {f"model.{n}": _full(p) for n, p in backbone.named_parameters()}
        for name, param in backbone.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"optim.state.{name}.{key}"] = _full(optim.state[param][key])
        images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
        with parts.strategy.evaluation() as module:
            module.eval()
            with torch.no_grad():
                batches = [module(images[i : i + 3]) for i in range(0, 3 * (ctx.rank + 1), 3)]
        out["embeddings"] = _full(batches[0])
    finally:
        parts.checkpointer.close()
    return out


def _resume_on(group, root: Path, ddp_from: str) -> dict:
    """The FSDP run from its step 2, and a DDP run from ``ddp_from``'s, for one step on
    ``group``; the restored FSDP state."""
    ctx = context_from_group(group, torch.device("cpu"))
    restored = _restored_fsdp(ctx, _config(root / "x", "fsdp", 3), _step2(root, "fsdp"))
    for engine, source in (("ddp", ddp_from), ("fsdp", "fsdp")):
        out = root / f"{engine}_on_{ctx.world_size}"
        train(_config(out, engine, 3, _step2(root, source)), ctx)
    return restored


def _resume_three_then_one(rank, world, root):
    """On all 3 ranks, then on a group of rank 0 alone (one spawn for both world sizes); there
    DDP resumes the FSDP checkpoint (the engines' checkpoints are interchangeable)."""
    _small_vit()
    root = Path(root)
    on_three = _resume_on(dist.group.WORLD, root, "ddp")
    alone = dist.new_group([0])  # every rank takes part in building it
    on_one = _resume_on(alone, root, "fsdp") if rank == 0 else None
    return {3: on_three, 1: on_one}


def _check_restored(restored: dict, ckpt: Path, monkeypatch) -> None:
    """Bit for bit the checkpoint's tensors; evaluation's copy embeds like ``load_backbone``."""
    saved = read_tree(ckpt, "backbone.")
    for key, value in restored.items():
        if key != "embeddings":
            np.testing.assert_array_equal(value, saved[f"backbone.{key}"].numpy(), err_msg=key)
    monkeypatch.setitem(model_config.VIT_SHAPES, "vit_t", SMALL_VIT)
    module, _ = load_backbone(ckpt)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():  # the same weights and buffers; GEMM blocking may differ by an ulp
        np.testing.assert_allclose(restored["embeddings"], module(images[:3]), rtol=1e-6, atol=1e-8)


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_on_other_rank_counts(tmp_path, monkeypatch):
    run_ranks(2, _train_two, str(tmp_path))
    ddp, fsdp = _logged(tmp_path / "ddp"), _logged(tmp_path / "fsdp")
    assert len(fsdp) == 3
    np.testing.assert_allclose(fsdp, ddp, rtol=RTOL)
    # the clipped norm: each FSDP shard counted once, as DDP counts each replicated gradient
    grad_norms = [_logged(tmp_path / engine, "grad_norm") for engine in ("fsdp", "ddp")]
    assert min(grad_norms[1]) > 5.0  # above optim.grad_clip: clipping acts on every step
    np.testing.assert_allclose(*grad_norms, rtol=RTOL)

    # eval/export: full tensors from the sharded checkpoint, the DDP run's within tolerance
    monkeypatch.setitem(model_config.VIT_SHAPES, "vit_t", SMALL_VIT)
    from_fsdp, _ = load_backbone(tmp_path / "fsdp")
    from_ddp, _ = load_backbone(tmp_path / "ddp")
    want = dict(from_ddp.named_parameters())
    for name, got in from_fsdp.named_parameters():
        # the BatchNorm bias between the head's two linear layers has no gradient in exact
        # arithmetic (the next BatchNorm removes any shift): its rounding noise, which AdamW
        # normalises into steps of +-lr, is all it learns, on either engine
        atol = 3e-3 if name == "feature.1.bias" else 1e-7
        np.testing.assert_allclose(got.detach(), want[name].detach(), rtol=1e-5, atol=atol)

    restored = run_ranks(3, _resume_three_then_one, str(tmp_path))[0]
    for world in (3, 1):
        _check_restored(restored[world], _step2(tmp_path, "fsdp"), monkeypatch)
        for key in ("loss", "grad_norm"):
            got = _logged(tmp_path / f"fsdp_on_{world}", key)
            assert len(got) == 1
            want = _logged(tmp_path / f"ddp_on_{world}", key)
            np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{key} on {world}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.fsdp.reshard_after_forward=false"], "train: fsdp.* settings apply to engine"),
        (
            ["train.engine=fsdp", "train.fsdp.reduce_dtype=bf16"],
            "fsdp.reduce_dtype 'bf16' must be 'fp32' or the training precision",
        ),
        (["train.engine=fsdp", "train.fsdp.reshard_after_forward=2"], "train.fsdp.reshard"),
        (["train.engine=fsdp", "train.fsdp.shard=block"], "train.fsdp.shard"),
        (["train.engine=fsdp", "train.zero_stage=2"], "train.zero_stage 2 applies to engine"),
    ],
)
def test_fsdp_config_refuses_bad_values(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):
        tiny_config(tmp_path, *overrides)
