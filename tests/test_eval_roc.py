"""Verification metrics against numbers worked out by hand from tiny score lists."""

from __future__ import annotations

import numpy as np
import pytest

from dist_cosface.eval.roc import (
    best_threshold,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)


def test_kfold_accuracy_hand_computed():
    # 20 pairs, folds of 2 consecutive pairs; even pairs are "same" (score 0.8), odd pairs
    # "different" (0.2), except same-pair 0 which scores 0.1. Whatever nine folds train the
    # threshold, the best one lies between 0.2 and 0.8 (midpoint 0.5). Fold 0 then gets pair 0
    # wrong (1/2), the other nine folds are perfect: mean (9 + 0.5) / 10 = 0.95,
    # std sqrt((9 * 0.05^2 + 0.45^2) / 10) = 0.15.
    issame = np.arange(20) % 2 == 0
    scores = np.where(issame, 0.8, 0.2)
    scores[0] = 0.1
    result = kfold_accuracy(scores, issame, n_folds=10)
    assert result["fold_accuracies"] == pytest.approx([0.5] + [1.0] * 9)
    assert result["accuracy"] == pytest.approx(0.95)
    assert result["accuracy_std"] == pytest.approx(0.15)
    assert result["best_threshold"] == pytest.approx(0.5)


def test_best_threshold_hand_computed_with_tie():
    # Sorted scores 0.9(same) 0.7(diff) 0.4(same) 0.3(diff). Accept-none: 2/4, above 0.8: 3/4,
    # above 0.55: 2/4, above 0.35: 3/4, accept-all: 2/4. The tie goes to the higher threshold.
    threshold, accuracy = best_threshold(np.array([0.4, 0.9, 0.3, 0.7]), [1, 1, 0, 0])
    assert threshold == pytest.approx(0.8)
    assert accuracy == pytest.approx(0.75)


def test_best_threshold_never_splits_tied_scores():
    # Two pairs share score 0.5 (one same, one different). Splitting them would claim 3/3;
    # the real options are accept-none 1/3, above 0.7 2/3, accept-all 2/3.
    threshold, accuracy = best_threshold(np.array([0.5, 0.5, 0.9]), [True, False, True])
    assert accuracy == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.7)


def test_tar_at_far_hand_computed():
    negatives = np.arange(10) / 10  # 0.0 ... 0.9
    positives = np.array([0.95, 0.85, 0.75, 0.5])
    scores = np.concatenate([negatives, positives])
    issame = np.array([False] * 10 + [True] * 4)
    # FAR 0.1 of 10 negatives: at most one above the threshold -> threshold 0.8; TAR = 2/4.
    assert tar_at_far(scores, issame, 0.1) == pytest.approx(0.5)
    # FAR 0.05 allows no false accept -> threshold 0.9 -> only 0.95 accepted.
    assert tar_at_far(scores, issame, 0.05) == pytest.approx(0.25)
    # FAR 0.3 -> three negatives above 0.6 -> 0.95, 0.85, 0.75 accepted.
    assert tar_at_far(scores, issame, 0.3) == pytest.approx(0.75)


def test_roc_auc_equals_pairwise_ranking_probability():
    # Positives 0.9, 0.6, 0.3 vs negatives 0.8, 0.3, 0.1: wins 3 + 2 + (1 + tie 0.5) = 6.5
    # out of 9 comparisons.
    scores = np.array([0.9, 0.6, 0.3, 0.8, 0.3, 0.1])
    issame = np.array([True, True, True, False, False, False])
    assert roc_auc(scores, issame) == pytest.approx(6.5 / 9)
    fpr, tpr = roc_curve(scores, issame)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_verification_metrics_keys_and_perfect_separation():
    issame = np.arange(40) % 2 == 0
    scores = np.where(issame, 0.7, -0.1) + np.linspace(0, 0.05, 40)
    result = verification_metrics(scores, issame, fars=[0.01, 0.1])
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["tar_at_far"] == {0.01: 1.0, 0.1: 1.0}
    assert result["roc_auc"] == pytest.approx(1.0) and result["num_pairs"] == 40


def test_metric_input_errors():
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        kfold_accuracy(np.zeros(3), [True, False])
    with pytest.raises(ValueError, match="n_folds"):
        kfold_accuracy(np.zeros(4), [True, False, True, False], n_folds=10)
    with pytest.raises(ValueError, match="far"):
        tar_at_far(np.zeros(2), [True, False], 1.5)
    with pytest.raises(ValueError, match="both"):
        roc_auc(np.zeros(2), [True, True])
