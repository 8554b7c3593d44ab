"""YTF-style video verification on "videos" made of Extended Yale B frames (symlinks)."""

from __future__ import annotations

import numpy as np
import pytest

from dist_cosface.eval.embedding import embed_images
from dist_cosface.eval.ytf import run_ytf
from dist_cosface.eval.ytf_pairs import frame_refs, read_video_pairs
from tests.eval_sets import build_ytf_set, numpy_normalize, pixel_backbone, yaleb
from tests.multiproc import on_subgroups, run_ranks

SIZE = 32


def numpy_fold_accuracy(scores, issame, folds):
    """Brute force: every candidate threshold on the training folds, ties to the highest."""
    accs = []
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        s = np.unique(scores[train])
        candidates = np.concatenate([[s[-1] + 1.0], (s[1:] + s[:-1]) / 2, [s[0] - 1.0]])
        accuracy = [np.mean((scores[train] > t) == issame[train]) for t in candidates]
        best = candidates[int(np.argmax(accuracy))]  # first max = highest threshold
        accs.append(np.mean((scores[test] > best) == issame[test]))
    return float(np.mean(accs)), float(np.std(accs))


def _ytf_on_subgroups(rank, world_size, pairs, frames):
    return on_subgroups(
        rank, world_size, lambda group: run_ytf(pixel_backbone(), pairs, frames, SIZE, "cpu", group)
    )


@pytest.mark.multiproc
def test_ytf_matches_numpy_on_1_and_2_ranks(tmp_path):
    pairs_path, frames = build_ytf_set(tmp_path, yaleb())
    per_rank = run_ranks(2, _ytf_on_subgroups, str(pairs_path), str(frames))
    vp = read_video_pairs(pairs_path, frames)
    refs, owner = frame_refs(vp.videos, 100)
    emb = numpy_normalize(embed_images(pixel_backbone(), refs, SIZE, "cpu", 1).numpy())
    feats = numpy_normalize(np.stack([emb[owner == v].mean(0) for v in range(len(vp.videos))]))
    scores = np.array([feats[a] @ feats[b] for a, b in vp.pairs])
    acc, std = numpy_fold_accuracy(scores, vp.issame, vp.folds)
    got = per_rank[0][1]
    assert got["num_videos"] == len(vp.videos) > 10 and got["num_frames"] == 5 * len(vp.videos)
    assert got["num_pairs"] == 40 and vp.issame.sum() == 20
    assert len(got["fold_accuracies"]) == 10
    assert got["accuracy"] == pytest.approx(acc) and got["accuracy_std"] == pytest.approx(std)
    assert 0.5 < got["accuracy"] <= 1.0
    assert per_rank[0][2] == per_rank[1][2] == got


def test_frame_cap_and_bad_pairs(tmp_path):
    pairs_path, frames = build_ytf_set(tmp_path, yaleb())
    vp = read_video_pairs(pairs_path, frames)
    refs, owner = frame_refs(vp.videos, 2)
    assert len(refs) == 2 * len(vp.videos) and (owner[:2] == 0).all()
    assert [r.path.name for r in refs[:2]] == ["0.jpg", "4.jpg"]  # evenly spaced, ends kept
    bad = tmp_path / "bad.txt"
    bad.write_text("yaleB01/0 yaleB01/1 1\n" * 10 + "yaleB01/0 nowhere/0 0\n")
    with pytest.raises(ValueError, match=rf"{bad}:11: frame folder .*nowhere/0 not found"):
        read_video_pairs(bad, frames)
    bad.write_text("yaleB01/0 yaleB01/1\n")
    with pytest.raises(ValueError, match=rf"{bad}:1: 2 fields"):
        read_video_pairs(bad, frames)
