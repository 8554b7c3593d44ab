"""Activation checkpointing of residual blocks (``model.activation_checkpointing``).

Each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant): only the block's
input is kept, and the block runs again in the backward pass to rebuild what its gradient
needs. Two things must not change the result:

- Random ops (ViT drop path): checkpoint saves the RNG state before the forward and restores
  it for the recomputation (``preserve_rng_state``, the default), so the same samples are
  dropped; the recomputation runs in a forked RNG, so later random ops are unaffected.
- BatchNorm (iResNet blocks): in training mode it normalises with the batch's statistics and
  also folds them into its running statistics. The recomputation must normalise the same way
  but must not fold them in a second time, so it runs with ``momentum = 0`` (the running
  update ``(1 - m) * running + m * batch`` then leaves them as they are) and the batch
  counter is put back afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``x`` through ``blocks`` in order; each one checkpointed when ``checkpointed`` is true
    and autograd is recording (in eval or under ``no_grad`` there is nothing to save)."""
    checkpointed = checkpointed and torch.is_grad_enabled()
    for block in blocks:
        if checkpointed:
            contexts = functools.partial(_recompute_contexts, block)
            x = checkpoint(block, x, use_reentrant=False, context_fn=contexts)
        else:
            x = block(x)
    return x


def _recompute_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    # (context of the first forward, context of the recomputation)
    return contextlib.nullcontext(), running_stats_frozen(block)


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Training-mode BatchNorms inside ``module`` normalise as usual but leave their running
    statistics and batch counters unchanged."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # also covers momentum=None (cumulative average), which would use 1/n
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)
