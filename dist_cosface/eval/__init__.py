"""Evaluation of a backbone: verification on .bin / pairs.txt sets (10-fold accuracy, TAR@FAR,
ROC) and the distributed benchmarks (MegaFace-style identification, IJB-B/C, YTF).

Layers, lowest first (a module imports only from its own layer or below; see
docs/architecture.md): files and ranks (config, verification_set, bin_file, pairs_file,
targets, make_set, images, ijb_meta, ytf_pairs, ranks, results); embedding; search and
metrics (topk, roc); benchmarks (pair_verification, megaface, ijb, ytf); the command (cli).
matplotlib loads only when a ROC plot is drawn."""

from __future__ import annotations

from dist_cosface.eval.bin_file import load_bin, write_bin
from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.make_set import make_verification_set
from dist_cosface.eval.pair_verification import evaluate, run_evaluation_all_ranks
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
