"""Reduced end-to-end checks of the paper-reproduction runner on a tiny real-face subset.

They check that the pipeline works (open-set split, pairs, training through the project's
head, metrics, CLI, 2-D plot), not the paper's numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_cosface.classifier import scale_lower_bound
from dist_cosface.experiments import ExperimentConfig, identity_split, make_pairs, run_experiment
from dist_cosface.experiments.runner import build_head, split_sets

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "orl").is_dir(), reason="no ../shared/data/orl")

TINY = dict(
    dataset="orl",
    image_size=16,
    width=4,
    embedding_size=8,
    epochs=2,
    batch_size=8,
    max_identities=4,
    max_per_identity=6,
    seed=0,
)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_identity_split_is_open_set_and_fixed():
    ids = [f"s{i}" for i in range(1, 41)]
    train, test = identity_split(ids, "test")
    assert test == [f"s{i}" for i in range(4, 41, 4)]  # every 4th identity, documented
    assert not set(train) & set(test) and len(train) + len(test) == 40
    val_train, val = identity_split(ids, "val")
    assert set(val_train) | set(val) == set(train)  # validation never touches test ids
    assert not set(val) & set(val_train) and len(val) == 7
    with pytest.raises(ValueError, match="split"):
        identity_split(ids, "holdout")


def test_make_pairs_balanced_and_correct():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pairs, issame = make_pairs(labels, max_pairs=100, seed=3)
    assert issame.sum() == (~issame).sum() == 3 + 1 + 6  # all positive pairs, as many negatives
    assert np.array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], torch.from_numpy(issame))
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    assert np.all(pairs[:, 0] < pairs[:, 1])
    with pytest.raises(ValueError, match="pairs"):
        make_pairs(torch.tensor([0, 1, 2]), max_pairs=100)


@needs_data
def test_run_experiment_end_to_end_open_set():
    cfg = ExperimentConfig(**TINY, margin_type="cosface", scale="auto", margin=0.2)
    train, held = split_sets(cfg, REPO)
    assert train.images.shape[1:] == (1, 16, 16) and train.images.dtype == torch.uint8
    assert not set(train.identities) & set(held.identities)
    result = run_experiment(cfg, REPO)
    assert result["num_train_identities"] == 4 and result["num_eval_identities"] == 4
    assert result["num_pairs"] == 2 * 4 * 15  # C(6, 2) positives per identity, balanced
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["roc_auc"] <= 1.0
    assert result["scale"] == pytest.approx(scale_lower_bound(4, 0.9))
    assert np.isfinite(result["final_loss"])


@needs_data
def test_training_through_the_head_learns():
    """More epochs on the training identities give lower training loss (the head trains)."""
    from dist_cosface.experiments import train_model

    cfg = ExperimentConfig(**{**TINY, "epochs": 1, "lr": 5e-3}, margin_type="softmax")
    train, _ = split_sets(cfg, REPO)
    short = train_model(cfg, train)[2]["final_loss"]
    cfg.epochs = 8
    long = train_model(cfg, train)[2]["final_loss"]
    assert long < short


@needs_data
def test_training_decays_the_rate_by_the_engine_cosine(monkeypatch):
    """Every backbone step runs at lr/2 (1 + cos(pi t / T)): the engine's cosine schedule."""
    from dist_cosface.experiments import train_model

    rates = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = ExperimentConfig(**TINY, lr=4e-3)
    train, _ = split_sets(cfg, REPO)
    total = train_model(cfg, train)[2]["steps"]
    expected = [2e-3 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert total > 2 and rates == pytest.approx(expected, rel=1e-12, abs=0)


@needs_data
def test_feature_norm_option_follows_the_head():
    cfg = ExperimentConfig(**TINY, feature_norm=False)
    assert not build_head(cfg, 5).cfg.feature_norm
    assert np.isfinite(run_experiment(cfg, REPO)["accuracy"])


@needs_data
def test_cli_run_and_table(tmp_path):
    tool = _load_tool("experiments")
    out = tmp_path / "r.jsonl"
    args = ["run", "--seeds", "0", "1", "--out", str(out)]
    for key, value in TINY.items():
        if key != "seed":
            args += [f"--{key.replace('_', '-')}", str(value)]
    tool.main(args + ["--margin-type", "nsl", "--margin", "0"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["config"]["seed"] for x in lines] == [0, 1]
    assert all(
        x["config"]["margin_type"] == "nsl" and "--margin-type nsl" in x["command"] for x in lines
    )
    table = tool.table([str(out)], None)
    assert "| run | orl | 2 | 30.00 |" in table  # row, dataset, seeds, scale
    assert table.count("| run |") == 1 and "2 runs" in table  # one row for both seeds
    with pytest.raises(SystemExit):
        tool.main(["run", "--no-such-key", "1"])


def test_angular_stats_and_plot(tmp_path):
    tool = _load_tool("plot_features_2d")
    # two tight classes at 0 and 90 degrees: gap 80 degrees, spread 10 degrees
    angles = np.radians([-5, 0, 5, 85, 90, 95])
    feats = np.stack([np.cos(angles), np.sin(angles)], 1) * 3.0
    labels = np.array([0, 0, 0, 1, 1, 1])
    stats = tool.angular_stats(feats, labels)
    assert stats["inter_class_gap_deg"] == pytest.approx(80.0)
    assert stats["intra_class_spread_deg"] == pytest.approx(10.0)
    out = tmp_path / "f.png"
    tool.plot([("softmax", feats, labels, stats), ("NSL", feats, labels, stats)], out)
    assert out.read_bytes()[:4] == b"\x89PNG"
