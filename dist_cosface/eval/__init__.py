"""Verification evaluation (.bin / pairs.txt sets, 10-fold accuracy, TAR@FAR, ROC) and ONNX
export. Heavy optional dependencies (matplotlib, onnx, onnxruntime) load only when used."""

from __future__ import annotations

from dist_cosface.eval.bin_file import load_bin, write_bin
from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.make_set import make_verification_set
from dist_cosface.eval.pairs_dist import evaluate, run_evaluation_all_ranks
from dist_cosface.eval.pairs_file import load_pairs
from dist_cosface.eval.targets import load_target, load_targets
from dist_cosface.eval.verification_set import VerificationSet

__all__ = [
    "EvalConfig",
    "VerificationSet",
    "evaluate",
    "load_bin",
    "load_pairs",
    "load_target",
    "load_targets",
    "make_verification_set",
    "run_evaluation_all_ranks",
    "write_bin",
]
