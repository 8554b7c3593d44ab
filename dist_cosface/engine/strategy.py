"""How the backbone is data-parallel: DDP, DeepSpeed or FSDP2, one strategy object chosen once.

The trainer never asks which engine runs; it calls the strategy for everything that differs:
the wrapped model, input dtype and autocast, the micro-batch backward, which gradients the
trainer norms and clips, the backbone's optimizer step, the optimizers the LR schedule sets,
the backbone gradient norm DeepSpeed computes on its own, what a checkpoint holds of the
backbone (``checkpoint_state`` in the DCP tree, ``native_checkpoint`` beside it) and the
module evaluation runs (``evaluation``). The sharded classifier and its row optimizer stay
outside all of them (their rows are never averaged or partitioned). FSDP2 lives in
``engine/fsdp.py``.

``train.compile`` compiles the backbone's training forward only; the classifier's autograd
Function stays eager. The checkpointed backbone keeps its own parameter names (no
``_orig_mod.`` prefix), so checkpoints move freely between compiled and eager runs. With DDP
the compiled wrapper (``torch.compile(backbone)``) goes inside DDP and ``backbone`` itself stays
the eager module that checkpoints, evaluation and export see; DeepSpeed compiles its module in
place (``engine.compile``), and evaluation then runs it eagerly (``evaluation``); FSDP
compiles its sharded root from outside and evaluates an eager unsharded copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from dist_cosface.distributed import DistContext
from dist_cosface.engine.amp import ShardedLossScaler
from dist_cosface.engine.builders import build_backbone_optimizer
from dist_cosface.engine.checkpoint.deepspeed_native import DeepSpeedCheckpoint
from dist_cosface.engine.checkpoint.train_state import BackboneState
from dist_cosface.engine.deepspeed_engine import (
    build_deepspeed_engine,
    engine_grad_norm,
    owns_backbone_grads,
)
from dist_cosface.engine.fsdp import FSDPStrategy
from dist_cosface.engine.torch_strategy import TorchOptimizerStrategy

if TYPE_CHECKING:
    from dist_cosface.config import RunConfig
    from dist_cosface.engine.config import TrainConfig


class DDPStrategy(TorchOptimizerStrategy):
    """Plain torch: the backbone in ``DistributedDataParallel`` (or bare in one process).

    ``model`` averages backbone gradients over the group on the last micro-batch of a step
    only; the loss is divided by the accumulation steps (and scaled for fp16) before backward.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ctx: DistContext,
        *,
        precision: str,
        accum_steps: int,
        compile_options: dict | None = None,
    ) -> None:
        self.backbone = backbone  # eager: checkpoints, evaluation
        self.model: torch.nn.Module = backbone  # the training forward
        if compile_options is not None:
            # inside DDP, as torch recommends: dynamo never traces DDP's Python forward and its
            # hooks, and still splits the graph at DDP's bucket borders (DDPOptimizer sees the
            # active DDP module when the compiled frame runs inside DDP's forward)
            self.model = torch.compile(backbone, **compile_options)
        if ctx.is_distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # only the backbone is wrapped: the classifier's rows are sharded, never averaged
            self.model = DistributedDataParallel(
                self.model, device_ids=device_ids, process_group=ctx.group
            )
        self._optimizer = optimizer
        self._distributed = ctx.is_distributed
        self._device = ctx.device
        self.precision = precision
        self.accum_steps = accum_steps
        self.scaler = ShardedLossScaler(precision == "fp16")

    def checkpoint_state(self) -> BackboneState:
        """The backbone's weights and optimizer, for the DCP state tree."""
        return BackboneState(self.backbone, self._optimizer)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """DDP all-reduces backbone gradients only on the last micro-batch of the step."""
        if self._distributed and not last:
            with self.model.no_sync():
                yield
        else:
            yield

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[torch.nn.Module]:
        """The module evaluation runs: ``backbone``, never compiled here (the compiled wrapper
        is ``model``'s)."""
        yield self.backbone


class DeepSpeedStrategy:
    """The backbone inside a DeepSpeed engine (ZeRO 0-2, bf16 master weights).

    ``engine.backward`` divides the loss by the accumulation steps itself, which also scales
    the classifier's gradients, so both halves see the same averaged loss as under DDP.
    """

    def __init__(
        self,
        engine: Any,
        *,
        owns_backbone_grads: bool,
        zero_stage: int,
        world_size: int,
        compile_options: dict | None = None,
    ) -> None:
        self.engine = engine
        self.compiled = compile_options is not None
        if compile_options is not None:
            # DeepSpeed's own entry: nn.Module.compile of engine.module, in place (the names
            # in DeepSpeed's checkpoint stay those of the eager module)
            options = dict(compile_options)
            engine.compile(backend=options.pop("backend"), compile_kwargs=options)
        self.zero_stage, self.world_size = zero_stage, world_size
        self.model = engine
        self.backbone: torch.nn.Module = engine.module
        # ZeRO >= 1 or bf16: backbone gradients live outside param.grad (see deepspeed_engine.py)
        self.owns_backbone_grads = owns_backbone_grads
        self.scaler = ShardedLossScaler(False)  # fp16 is refused with DeepSpeed (config)

    def checkpoint_state(self) -> BackboneState:
        """The backbone's weights only (for eval and export): the optimizer is DeepSpeed's."""
        return BackboneState(self.backbone, None)

    def native_checkpoint(self) -> DeepSpeedCheckpoint:
        """DeepSpeed's own checkpoint: ZeRO partitions, master weights, optimizer."""
        return DeepSpeedCheckpoint(self.engine, self.zero_stage, self.world_size)

    def cast_inputs(self, images: torch.Tensor) -> torch.Tensor:
        # DeepSpeed bf16 keeps the backbone itself in bf16: inputs follow its dtype
        return images.to(next(self.backbone.parameters()).dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # no autocast on top of DeepSpeed's own precision

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        del last  # DeepSpeed decides itself when to reduce gradients
        yield

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss)  # divides by the accumulation steps itself
        if not last:
            self.engine.step()  # DeepSpeed counts micro-steps; no update yet

    def clip_params(self, head_params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Classifier only when DeepSpeed holds (and clips) the backbone's gradients."""
        if self.owns_backbone_grads:
            return head_params
        return list(self.backbone.parameters()) + head_params

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.engine.optimizer]

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)

    def backbone_grad_norm(self) -> float | None:
        """The backbone norm DeepSpeed computed in its step when it clipped it itself."""
        if not self.owns_backbone_grads:
            return None
        return engine_grad_norm(self.engine)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[torch.nn.Module]:
        """The module evaluation runs, ``backbone``; compiled in place, it runs eagerly inside:
        the compiled graph is the training one, and eval mode under ``no_grad`` would compile
        another for a pass run a few times per run; eager also gives the figures an eager run
        gives."""
        if not self.compiled:
            yield self.backbone
            return
        with torch.compiler.set_stance("force_eager"):
            yield self.backbone


Strategy = DDPStrategy | DeepSpeedStrategy | FSDPStrategy


def compile_options(train: TrainConfig) -> dict | None:
    """``torch.compile`` keyword arguments per ``train.compile*``; None when it is off."""
    if not train.compile:
        return None
    options: dict = {"backend": train.compile_backend}
    if train.compile_mode != "default":
        options["mode"] = train.compile_mode
    return options


class CompilerUnavailable(RuntimeError):
    """``train.compile`` was asked for and torch.compile cannot work on this machine."""


def check_compiler(train: TrainConfig, device: torch.device) -> None:
    """Fail at start-up, in one line, when ``train.compile`` cannot work on this machine.

    Compiles and runs a small function with the configured backend and mode on ``device``
    (dynamo, AOTAutograd, code generation, the C++ or Triton toolchain, loading); on the CPU
    with inductor the C++ compiler is looked up first, since a cached probe would not call it.
    Raises CompilerUnavailable naming the key, the backend and what failed.
    """
    options = compile_options(train)
    if options is None:
        return
    try:
        if train.compile_backend == "inductor" and device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # the compiler inductor would call (g++ or $CXX)
        _run_compile_probe(options, device)
    except Exception as exc:  # noqa: BLE001 - any failure means the compiler is unusable
        detail = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {detail[0]}" if detail else type(exc).__name__
        raise CompilerUnavailable(
            f"train.compile=true: torch.compile(backend={train.compile_backend!r}) does not work "
            f"on this machine ({device.type}): {reason}. Install what it needs (a C++ compiler "
            "such as g++ on the PATH or in $CXX for inductor on the CPU; Triton for CUDA) or "
            "set train.compile=false"
        ) from exc


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x).square() + x


def _run_compile_probe(options: dict, device: torch.device) -> None:
    """Compile and run one small function (a single fused kernel: seconds, not the model's
    minutes) and compare it with eager."""
    x = torch.linspace(-3.0, 3.0, 64, device=device)
    got = torch.compile(_probe, **options)(x)
    if not torch.allclose(got, _probe(x), rtol=1e-5, atol=1e-6):
        raise RuntimeError("the compiled probe computes a different result from eager")


def _check_compiles_in_place(backbone: torch.nn.Module) -> None:
    """``nn.Module.compile`` (DeepSpeed's ``engine.compile``) silently compiles nothing when
    the module's ``forward`` is torch's own (``nn.Sequential``...): dynamo skips torch.nn code."""
    forward = type(backbone).forward
    if forward.__module__.split(".")[0] == "torch":
        raise ValueError(
            "train.compile with train.engine='deepspeed' compiles the backbone in place, which "
            f"torch skips for a forward of its own ({forward.__qualname__}): wrap the backbone "
            "in a module class of your own, or use train.engine='ddp'"
        )


def build_strategy(cfg: RunConfig, ctx: DistContext, backbone: torch.nn.Module) -> Strategy:
    """Wrap ``backbone`` (already on ``ctx.device``) per ``cfg.train.engine``; compile it per
    ``cfg.train.compile`` (compilation itself happens at the first training forward).

    ``fsdp`` on one process without torch.distributed has nothing to shard: it runs DDP's
    single-process path (the plain module), whose checkpoints have the same layout.
    """
    options = compile_options(cfg.train)
    if cfg.train.engine == "fsdp" and ctx.is_distributed:
        return FSDPStrategy(
            backbone,
            ctx,
            cfg.train.fsdp,
            optim_builder=lambda params: build_backbone_optimizer(params, cfg.optim),
            precision=cfg.train.precision,
            accum_steps=cfg.optim.grad_accum_steps,
            compile_options=options,
        )
    optimizer = build_backbone_optimizer(backbone.parameters(), cfg.optim)
    if cfg.train.engine == "deepspeed":
        if options is not None:
            _check_compiles_in_place(backbone)
        engine = build_deepspeed_engine(backbone, optimizer, cfg, ctx)
        return DeepSpeedStrategy(
            engine,
            owns_backbone_grads=owns_backbone_grads(cfg),
            zero_stage=cfg.train.zero_stage,
            world_size=ctx.world_size,
            compile_options=options,
        )
    return DDPStrategy(
        backbone,
        optimizer,
        ctx,
        precision=cfg.train.precision,
        accum_steps=cfg.optim.grad_accum_steps,
        compile_options=options,
    )
