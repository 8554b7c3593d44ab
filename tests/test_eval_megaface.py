"""MegaFace-style identification on a small set built from Extended Yale B.

Probes: 5 identities x 6 images (symlinks); distractors: 150 images of other identities (a file
list). Every figure is checked against a brute-force numpy reference over the full score matrix,
and the distributed run on 1, 2 and 3 gloo ranks must give the same figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist

from dist_cosface.eval.embedding import embed_images
from dist_cosface.eval.images import list_distractors, list_identity_folders
from dist_cosface.eval.megaface import counts_that_fit, run_megaface
from tests.eval_sets import (
    build_megaface_set,
    numpy_normalize,
    numpy_tar_at_far,
    pixel_backbone,
    yaleb,
)
from tests.multiproc import on_subgroups, run_ranks

FARS = (1e-6, 1e-2)
SIZE = 32


def numpy_megaface(probe_emb, labels, distractor_emb, n, fars):
    """Brute force over the full [probes, distractors] matrix."""
    p, d = numpy_normalize(probe_emb), numpy_normalize(distractor_emb[:n])
    labels = np.asarray(labels)
    impostor = p @ d.T
    ranks, genuine = [], []
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j and labels[i] == labels[j]:
                s = p[i] @ p[j]
                genuine.append(s)
                ranks.append(1 + int(np.sum(impostor[i] >= s)))
    ranks, genuine = np.array(ranks), np.array(genuine)
    return {
        "cmc": [float(np.mean(ranks <= r)) for r in range(1, 11)],
        "tar_at_far": {far: numpy_tar_at_far(genuine, impostor.ravel(), far) for far in fars},
        "num_genuine_pairs": len(genuine),
    }


def _megaface_on_subgroups(rank, world_size, probes, distractors):
    def run(group):
        backbone = pixel_backbone()
        opts = {"batch_size": 4, "fars": FARS, "chunk_size": 7}
        return run_megaface(backbone, probes, distractors, SIZE, "cpu", group, **opts)

    return on_subgroups(rank, world_size, run)


@pytest.fixture(scope="module")
def megaface_set(tmp_path_factory):
    return build_megaface_set(tmp_path_factory.mktemp("megaface"), yaleb())


@pytest.mark.multiproc
def test_megaface_matches_numpy_on_1_2_3_ranks(megaface_set):
    probes, distractors = megaface_set
    per_rank = run_ranks(3, _megaface_on_subgroups, str(probes), str(distractors))
    refs, labels, _ = list_identity_folders(probes)
    backbone = pixel_backbone()
    probe_emb = embed_images(backbone, refs, SIZE, "cpu", batch_size=1).numpy()
    dist_emb = embed_images(backbone, list_distractors(distractors), SIZE, "cpu", 1).numpy()
    first = per_rank[0][1]
    assert first["num_distractors"] == 150 and first["num_probe_images"] == 30
    assert sorted(first["by_count"]) == [10, 100]
    for n, got in first["by_count"].items():
        ref = numpy_megaface(probe_emb, labels, dist_emb, n, FARS)
        assert got["num_genuine_pairs"] == ref["num_genuine_pairs"] == 5 * 6 * 5
        assert got["num_impostor_pairs"] == 30 * n
        np.testing.assert_allclose(got["cmc"], ref["cmc"], atol=1e-12)
        assert got["rank1"] == got["cmc"][0]
        for far in FARS:
            assert got["tar_at_far"][far] == pytest.approx(ref["tar_at_far"][far], abs=1e-12)
    # the pixel embedder is weak but not useless: more distractors, fewer rank-1 hits
    assert 0 < first["by_count"][100]["rank1"] <= first["by_count"][10]["rank1"] < 1
    for size in (1, 2, 3):
        for rank in range(size):
            assert per_rank[rank][size] == first, (size, rank)


def test_counts_that_fit():
    assert counts_that_fit(150) == [10, 100]
    assert counts_that_fit(1_000_000)[-1] == 1_000_000
    assert counts_that_fit(7) == [7]
    with pytest.raises(ValueError, match="empty distractor set"):
        counts_that_fit(0)


def test_distractor_sources(tmp_path, megaface_set):
    _, listing = megaface_set
    paths = [line for line in listing.read_text().splitlines() if line][:12]
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in paths:
        (flat / p.rsplit("/", 1)[1]).symlink_to(p)
    assert len(list_distractors(flat)) == 12
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: empty distractor set"):
        list_distractors(empty)
    bad_list = tmp_path / "list.txt"
    bad_list.write_text(f"{paths[0]}\n\n{tmp_path}/missing.jpg\n")
    with pytest.raises(ValueError, match=rf"{bad_list}:3: image .*missing.jpg.* not found"):
        list_distractors(bad_list)


def test_shard_set_distractors(tmp_path, megaface_set):
    from dist_cosface.data.convert import ConvertOptions, convert

    _, listing = megaface_set
    paths = [line for line in listing.read_text().splitlines() if line][:10]
    tree = tmp_path / "tree" / "all"
    tree.mkdir(parents=True)
    for p in paths:
        (tree / p.rsplit("/", 1)[1]).symlink_to(p)
    convert(tmp_path / "tree", tmp_path / "shards", ConvertOptions(shard_size=4, progress=False))
    refs = list_distractors(tmp_path / "shards")
    assert len(refs) == 10 and all(r.offset >= 0 for r in refs)
    from pathlib import Path

    assert sorted(r.read_bytes() for r in refs) == sorted(Path(p).read_bytes() for p in paths)


def _corrupt_on_last_rank(rank, world_size, probes, distractors):
    try:
        run_megaface(pixel_backbone(), probes, distractors, SIZE, "cpu", dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.multiproc
def test_unreadable_distractor_on_one_rank_stops_all(tmp_path, megaface_set):
    probes, listing = megaface_set
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("this is text")
    distractors = tmp_path / "distractors.txt"
    distractors.write_text(listing.read_text() + f"{bad}\n")  # the last rank's slice
    messages = run_ranks(2, _corrupt_on_last_rank, str(probes), str(distractors), timeout_s=120)
    for message in messages:
        assert message is not None and "not_an_image.jpg" in message
