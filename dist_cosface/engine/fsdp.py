"""FSDP2 (``train.engine: fsdp``): the backbone's weights, gradients and optimizer state
sharded over the ranks with ``torch.distributed.fsdp.fully_shard``.

Every residual block (a ViT ``TransformerBlock``, an iResNet ``IBasicBlock``) is one FSDP
unit, and the root unit holds the rest (stem or patch embedding, position embedding, the
embedding head). Each rank keeps a ``Shard(0)`` piece of every parameter (a DTensor) and the
optimizer state of that piece only; a unit's full weights are all-gathered just before its
forward and, with ``train.fsdp.reshard_after_forward`` (the default), freed after it and
gathered again for its backward; its gradients are reduce-scattered (averaged over the ranks)
right after its backward. The root unit keeps its weights from the forward to the backward
(torch's default for the root: its backward starts at once).

Precision (``train.precision``, ``train.fsdp.reduce_dtype``): the sharded (master) weights
and the optimizer stay float32; bf16 / fp16 gather the weights in that dtype for the forward
and backward (``MixedPrecisionPolicy.param_dtype``: half the all-gather bytes) and run the
ops under autocast as the DDP engine does (norms and softmax in float32); the gradients are
reduce-scattered in ``reduce_dtype`` (float32 by default) and land in float32 shards. fp16
uses the project's ``ShardedLossScaler``: the overflow decision comes from the global gradient
norm, so every rank skips the same steps.

Gradient norm and clipping: the parameters are marked ``sharding.mark_sharded``, so
``grad_norm.global_grad_norm_and_votes`` adds each rank's local shard (every element counted
once) instead of taking replicated gradients from rank 0. BatchNorm running statistics are
buffers, never sharded and never reduced: each rank's follow its own batches (DDP copies rank
0's at every forward); before a checkpoint or an evaluation every rank takes rank 0's.

Checkpoints hold the backbone under the same keys as a DDP run's (``backbone.model.<name>``,
``backbone.optim.state.<name>.*``), as DTensors written by every rank in parallel and read by
DCP into the layout of any other rank count; a DDP checkpoint resumes under FSDP and back,
and ``dist-cosface eval/export`` read full tensors (``checkpoint.reader.load_backbone``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from dist_cosface.distributed import DistContext
from dist_cosface.engine.amp import ShardedLossScaler
from dist_cosface.engine.checkpoint.contract import MODEL, OPTIM
from dist_cosface.engine.config import FSDPConfig
from dist_cosface.engine.torch_strategy import TorchOptimizerStrategy
from dist_cosface.models.iresnet import IBasicBlock
from dist_cosface.models.vit import TransformerBlock
from dist_cosface.sharding import mark_sharded

# the residual blocks that become FSDP units of their own
BLOCK_TYPES: tuple[type[nn.Module], ...] = (TransformerBlock, IBasicBlock)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_policy(param_dtype: str, reduce_dtype: str):
    """FSDP's dtypes: weights gathered in ``param_dtype``, gradients reduced in
    ``reduce_dtype``; float32 needs no cast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=None if param_dtype == "fp32" else _DTYPES[param_dtype],
        reduce_dtype=None if reduce_dtype == "fp32" else _DTYPES[reduce_dtype],
        output_dtype=None,  # a unit's output leaves in its compute dtype
    )


def shard_units(backbone: nn.Module) -> list[nn.Module]:
    """The blocks that become FSDP units of their own, outermost first (none nested)."""
    units: list[nn.Module] = []
    for module in backbone.modules():
        if module is not backbone and isinstance(module, BLOCK_TYPES):
            if not any(_contains(unit, module) for unit in units):
                units.append(module)
    return units


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _own_modules(module: nn.Module, units: list[nn.Module]) -> Iterator[nn.Module]:
    """``module`` and its descendants, without the subtrees of other units."""
    yield module
    for child in module.children():
        if not any(child is unit for unit in units):
            yield from _own_modules(child, units)


def _holds_batch_norm(unit: nn.Module, units: list[nn.Module]) -> bool:
    return any(isinstance(m, _BatchNorm) for m in _own_modules(unit, units))


def shard_backbone(backbone: nn.Module, mesh, cfg: FSDPConfig, precision: str) -> nn.Module:
    """``fully_shard`` every block, then the root; returns the root (``backbone`` itself, now
    an ``FSDPModule`` whose parameters are DTensor shards, each marked sharded).

    A unit holding BatchNorm keeps float32 weights (BatchNorm's weight must match its float32
    running statistics; its input may be bf16 / fp16); the others gather theirs in
    ``param_dtype``.
    """
    from torch.distributed.fsdp import fully_shard

    param_dtype, reduce_dtype = cfg.dtypes(precision)
    units = shard_units(backbone)

    def policy(unit: nn.Module):
        fp32 = _holds_batch_norm(unit, units)
        return mixed_precision_policy("fp32" if fp32 else param_dtype, reduce_dtype)

    for unit in units:
        fully_shard(
            unit,
            mesh=mesh,
            reshard_after_forward=cfg.reshard_after_forward,
            mp_policy=policy(unit),
        )
    # the root: torch's choice for reshard_after_forward (keep, its backward starts at once)
    fully_shard(backbone, mesh=mesh, mp_policy=policy(backbone))
    for param in backbone.parameters():
        mark_sharded(param)  # global norm: each rank's shard counts once
    return backbone


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no memory):
    the plain module that evaluation fills with the full weights."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(module, memo)


def broadcast_buffers(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Every rank's buffers (BatchNorm running statistics) set to group rank 0's, in one
    broadcast per dtype."""
    src = dist.get_global_rank(group, 0)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    with torch.no_grad():
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=src, group=group)
            for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
                buffer.copy_(value.view_as(buffer))


def host_copy_sharded(tree):
    """``tree`` with every tensor a host copy; a DTensor stays a DTensor with the same global
    shape and placements (its local piece copied), so DCP writes each rank's piece."""

    def copy_one(value):
        if isinstance(value, DTensor):
            local = value.to_local().detach().to("cpu", copy=True)
            return DTensor.from_local(
                local,
                value.device_mesh,
                value.placements,
                run_check=False,
                shape=value.shape,
                stride=value.stride(),
            )
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        return value

    return tree_map(copy_one, tree)


class FSDPBackboneState:
    """The sharded backbone's weights and optimizer state for the DCP tree (``Stateful``).

    Same layout and keys as ``checkpoint.train_state.BackboneState`` (``model`` and ``optim``), with
    DTensor ``Shard(0)`` pieces for the parameters and their optimizer state; buffers are
    plain tensors, rank 0's on every rank (a collective: every rank calls ``state_dict``).
    """

    def __init__(self, backbone: nn.Module, optimizer: torch.optim.Optimizer, group) -> None:
        self.backbone, self.optimizer, self.group = backbone, optimizer, group

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        broadcast_buffers(self.backbone, self.group)
        return host_copy_sharded(
            {
                MODEL: get_model_state_dict(self.backbone),
                OPTIM: get_optimizer_state_dict(self.backbone, self.optimizer),
            }
        )

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(self.backbone, state[MODEL])
        set_optimizer_state_dict(self.backbone, self.optimizer, state[OPTIM])


class FSDPStrategy(TorchOptimizerStrategy):
    """The backbone sharded by FSDP2 over ``ctx.group`` (see the module docstring).

    ``model`` is the FSDP root (or ``torch.compile`` of it under ``train.compile``; the
    parameter names stay the eager module's); the loss is divided by the accumulation steps
    (and scaled for fp16) before backward, as under DDP.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ctx: DistContext,
        cfg: FSDPConfig,
        *,
        optim_builder,
        precision: str,
        accum_steps: int,
        compile_options: dict | None = None,
    ) -> None:
        from torch.distributed.device_mesh import DeviceMesh

        if ctx.group is None:
            raise ValueError("train.engine='fsdp' needs a process group (one process runs DDP)")
        self._skeleton = meta_skeleton(backbone)  # before sharding: the plain module's shape
        mesh = DeviceMesh.from_group(ctx.group, ctx.device.type)
        self.backbone = shard_backbone(backbone, mesh, cfg, precision)
        self.model: nn.Module = self.backbone
        if compile_options is not None:
            # outside FSDP: dynamo traces the units' hooks with their forwards
            self.model = torch.compile(self.backbone, **compile_options)
        self._optimizer = optim_builder(self.backbone.parameters())  # over the shards
        self._group, self._device = ctx.group, ctx.device
        self.precision = precision
        self.accum_steps = accum_steps
        self.scaler = ShardedLossScaler(precision == "fp16")

    def checkpoint_state(self) -> FSDPBackboneState:
        """Weights and optimizer state as DTensor shards, for the DCP state tree."""
        return FSDPBackboneState(self.backbone, self._optimizer, self._group)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Gradients are reduce-scattered on the last micro-batch only (accumulated unsharded
        before it: DDP's ``no_sync``)."""
        self.backbone.set_requires_gradient_sync(last)
        yield

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        """A plain (unsharded, eager) copy of the backbone with the full float32 weights and
        rank 0's buffers, built on every rank (collective): evaluation gives each rank its own
        number of batches, which sharded units (one all-gather per forward) cannot run."""
        module = copy.deepcopy(self._skeleton).to_empty(device=self._device)
        broadcast_buffers(self.backbone, self._group)
        sharded = dict(self.backbone.named_parameters())
        buffers = dict(self.backbone.named_buffers())
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(sharded[name].full_tensor())  # all-gather, same order on every rank
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
        yield module
