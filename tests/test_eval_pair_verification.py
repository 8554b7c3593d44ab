"""Pair verification split over ranks (evaluation during training) equals the one-process run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.pair_verification import run_evaluation_all_ranks
from tests.eval_sets import pixel_backbone, yaleb_bin
from tests.multiproc import run_ranks


def _on_ranks(rank, world_size, cfg, out):
    torch.set_num_threads(1)
    return run_evaluation_all_ranks(pixel_backbone(), cfg, "cpu", 32, out, dist.group.WORLD)


@pytest.mark.multiproc
def test_all_rank_pair_evaluation_equals_one_process_evaluation(tmp_path):
    target = yaleb_bin(tmp_path / "yb.bin")
    cfg = EvalConfig(targets=[str(target)], batch_size=4, n_folds=3, fars=[0.1])
    ref = run_evaluation_all_ranks(pixel_backbone(), cfg, "cpu", 32, tmp_path / "one", None)
    per_rank = run_ranks(3, _on_ranks, cfg, str(tmp_path / "three"))
    assert 0.0 < ref["yb"]["accuracy"] < 1.0  # not a degenerate figure
    for got in per_rank:
        assert got["yb"].pop("roc_png").endswith("roc_yb.png")
        ref_yb = {k: v for k, v in ref["yb"].items() if k != "roc_png"}
        assert got["yb"] == ref_yb  # per-image exact embedder: identical figures
    written = json.loads((tmp_path / "three" / "eval.json").read_text())
    assert written["yb"]["num_pairs"] == 21 and (tmp_path / "three" / "roc_yb.png").is_file()
