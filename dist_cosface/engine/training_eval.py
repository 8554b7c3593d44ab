"""Evaluation during and after training: never fails the run it belongs to."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dist_cosface.distributed import DistContext
from dist_cosface.eval.pair_verification import run_evaluation_all_ranks

if TYPE_CHECKING:
    from dist_cosface.config import RunConfig

log = logging.getLogger(__name__)


def evaluate_backbone(
    cfg: RunConfig, ctx: DistContext, backbone: torch.nn.Module, out: Path
) -> dict:
    """Every rank embeds its share of ``cfg.eval.targets``; returns the results per target.

    Never raises: an evaluation failure must not turn a trained run into a failed one. Targets
    that fail are logged and recorded with an ``error`` entry (in eval.json too).
    """
    backbone.eval()
    try:
        with torch.no_grad():
            return run_evaluation_all_ranks(
                backbone,
                cfg.eval,
                ctx.device,
                cfg.data.image_size,
                out,
                ctx.group,
                keep_going=True,
            )
    except Exception as exc:  # beyond one target: e.g. eval.json cannot be written
        log.exception("evaluation failed; checkpoints and metrics.jsonl are kept")
        return {str(t): {"error": f"{type(exc).__name__}: {exc}"} for t in cfg.eval.targets}
    finally:
        backbone.train()
