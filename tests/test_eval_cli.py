"""``dist-cosface eval`` with the distributed benchmarks: 1 process vs 2 gloo ranks."""

from __future__ import annotations

import argparse
import json

import pytest

from dist_cosface.cliargs import UsageError
from dist_cosface.eval.cli import add_eval_arguments, run_eval_command
from tests.eval_sets import (
    build_ijb_set,
    build_megaface_set,
    build_ytf_set,
    pixel_backbone,
    yaleb,
    yaleb_bin,
)
from tests.multiproc import run_ranks


def load_pixel_backbone(checkpoint: str):
    return pixel_backbone(), 32


def _args(argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def _argv(root, out):
    """The command line over sets built once under ``root``."""
    if not (root / "ijb").exists():
        build_megaface_set(root / "mf", yaleb())
        build_ijb_set(root / "ijb", yaleb())
        build_ytf_set(root / "ytf", yaleb())
        yaleb_bin(root / "yb.bin")
    probes, distractors = root / "mf" / "probes", root / "mf" / "distractors.txt"
    return [
        str(root),  # the checkpoint argument must exist; the test's loader ignores it
        "--target",
        str(root / "yb.bin"),
        "--far",
        "0.1",
        "--megaface",
        str(probes),
        str(distractors),
        "--distractor-counts",
        "10",
        "150",
        "--ijb",
        str(root / "ijb"),
        "ijbx",
        "--detector-score",
        "--ytf",
        str(root / "ytf" / "splits.txt"),
        str(root / "ytf" / "frames"),
        "--batch-size",
        "5",
        "--chunk-size",
        "33",
        "--out-dir",
        str(out),
    ]


def _eval_on_ranks(rank, world_size, argv):
    import torch

    torch.set_num_threads(1)
    return run_eval_command(_args(argv), load_pixel_backbone)


@pytest.mark.multiproc
def test_eval_benchmarks_same_on_1_and_2_ranks(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_eval_command(_args(_argv(tmp_path, one)), load_pixel_backbone) == 0
    out = capsys.readouterr().out
    assert "megaface 150 distractors: rank-1" in out and "ijbx 1:N G1: rank-1" in out
    assert "ytf: accuracy" in out
    assert run_ranks(2, _eval_on_ranks, _argv(tmp_path, two)) == [0, 0]
    single = json.loads((one / "eval.json").read_text())
    double = json.loads((two / "eval.json").read_text())
    assert set(single) == {"yb", "megaface", "ijbx", "ytf"} and "yb: accuracy" in out
    assert sorted(single["megaface"]["by_count"]) == ["10", "150"]
    assert (one / "roc_ijbx.png").is_file() and (two / "roc_ijbx.png").is_file()
    for key in ("ijbx", "yb"):
        double[key]["roc_png"] = single[key]["roc_png"]
    assert single == double  # the pixel embedder is per-image exact, so equality is exact


def test_eval_needs_something_to_do(tmp_path):
    with pytest.raises(UsageError, match="nothing to evaluate: give --target"):
        run_eval_command(_args([str(tmp_path)]), load_pixel_backbone)


def test_too_many_distractors_is_a_clear_error(tmp_path):
    argv = _argv(tmp_path, tmp_path / "out")
    argv[argv.index("150")] = "151"
    argv[argv.index("--target") : argv.index("--target") + 4] = []
    with pytest.raises(ValueError, match=r"distractor counts \[151\] not in \[1, 150\]"):
        run_eval_command(_args(argv), load_pixel_backbone)
