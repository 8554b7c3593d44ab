"""IJB-format 1:1 and 1:N evaluation on a small set built from Extended Yale B.

6 identities x 12 images (symlinks named like IJB crops); 3 templates per identity, 2 media per
template; landmarks = a face pose of the template points plus jitter; random detector scores.
Every figure is checked against a numpy reference written here, on 1, 2 and 3 gloo ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_cosface.eval.embedding import embed_images
from dist_cosface.eval.ijb import run_ijb, template_features
from dist_cosface.eval.ijb_meta import read_ijb
from tests.eval_sets import build_ijb_set, numpy_normalize, numpy_tar_at_far, pixel_backbone, yaleb
from tests.multiproc import on_subgroups, run_ranks

SIZE = 32
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def numpy_ijb(root, detector_score):
    """Reference pipeline on per-image embeddings computed one image at a time."""
    ijb = read_ijb(root, "ijbx")
    skipped: list[int] = []
    emb = embed_images(pixel_backbone(), ijb.images, SIZE, "cpu", 1, True, skipped).numpy()
    emb = numpy_normalize(np.where(np.abs(emb).sum(1, keepdims=True) > 0, emb, 1.0))
    if detector_score:
        emb = emb * ijb.scores[:, None]
    feats = {}
    for t in np.unique(ijb.templates):
        media = {}
        for i in range(len(ijb.images)):
            if ijb.templates[i] == t and i not in skipped:
                media.setdefault(ijb.media[i], []).append(emb[i])
        pooled = np.mean([np.mean(v, axis=0) for v in media.values()], axis=0)
        feats[int(t)] = pooled / np.linalg.norm(pooled)
    scores = np.array([feats[a] @ feats[b] for a, b in ijb.pairs])
    return ijb, feats, scores, skipped


def numpy_identification(feats, gallery, probes, fpirs=(1e-2, 1e-1)):
    subjects = sorted(set(gallery.values()))
    ranks, true_scores, mated_best, nonmated_best = [], [], [], []
    for p, subj in sorted(probes.items()):
        per_subject = {
            s: max(feats[p] @ feats[g] for g in gallery if gallery[g] == s) for s in subjects
        }
        best = max(per_subject.values())
        if subj in per_subject:
            true = per_subject[subj]
            ranks.append(sum(v >= true for v in per_subject.values()))
            true_scores.append(true)
            mated_best.append(best)
        else:
            nonmated_best.append(best)
    ranks, true_scores = np.array(ranks), np.array(true_scores)
    nonmated = np.array(nonmated_best)
    tpir = {}
    for fpir in fpirs:
        # lowest threshold among non-mated scores whose false-positive rate is <= fpir
        ok = [t for t in nonmated if np.mean(nonmated > t) <= fpir]
        t = min(ok)
        tpir[fpir] = float(np.mean((ranks == 1) & (true_scores > t)))
    return {"cmc": {r: float(np.mean(ranks <= r)) for r in (1, 5, 10)}, "tpir_at_fpir": tpir}


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    build_ijb_set(root, yaleb())
    return root


def _ijb_on_subgroups(rank, world_size, root, detector_score):
    def run(group):
        backbone = pixel_backbone()
        return run_ijb(
            backbone, root, "ijbx", SIZE, "cpu", group, batch_size=3, detector_score=detector_score
        )

    return on_subgroups(rank, world_size, run)


@pytest.mark.multiproc
@pytest.mark.parametrize("detector_score", [False, True])
def test_ijb_matches_numpy_on_1_2_3_ranks(ijb_root, detector_score):
    per_rank = run_ranks(3, _ijb_on_subgroups, str(ijb_root), detector_score)
    ijb, feats, scores, skipped = numpy_ijb(ijb_root, detector_score)
    got = per_rank[0][1]
    assert got["num_images"] == 72 and got["skipped_images"] == len(skipped) == 1
    assert got["num_templates"] == 18
    ver = got["verification"]
    assert ver["num_pairs"] == 153 and ver["num_genuine"] == 6 * 3
    genuine, impostor = scores[ijb.labels], scores[~ijb.labels]
    for far in FARS:
        assert ver["tar_at_far"][far] == pytest.approx(numpy_tar_at_far(genuine, impostor, far))
    assert 0 < ver["tar_at_far"][1e-1] < 1
    for name, gallery in ijb.galleries.items():
        ref = numpy_identification(feats, gallery, ijb.probes)
        ident = got["identification"][name]
        assert ident["num_mated"] == 6 and ident["num_nonmated"] == 6
        assert ident["cmc"] == pytest.approx(ref["cmc"])
        assert ident["tpir_at_fpir"] == pytest.approx(ref["tpir_at_fpir"])
    for size in (1, 2, 3):
        for rank in range(size):
            assert per_rank[rank][size] == got, (size, rank)


def test_roc_png_and_single_process(ijb_root, tmp_path):
    png = tmp_path / "r.png"
    out = run_ijb(pixel_backbone(), ijb_root, "ijbx", SIZE, "cpu", None, roc_path=png)
    assert png.stat().st_size > 0 and out["roc_png"] == str(png)


def _edit(root, tmp_path, name, fn):
    """A copy of the meta folder (symlinked crops) with one file's bytes edited by ``fn``."""
    import shutil

    copy = tmp_path / "ijb"
    shutil.copytree(root / "meta", copy / "meta")
    (copy / "loose_crop").symlink_to(root / "loose_crop")
    path = copy / "meta" / name
    path.write_bytes(fn(path.read_bytes()))
    return copy, path


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("ijbx_face_tid_mid.txt", lambda ls: ls[:2] + ["3.jpg 106"] + ls[3:], r":3: 2 fields"),
        ("ijbx_face_tid_mid.txt", lambda ls: ["nope.jpg 103 1"] + ls[1:], r":1: image nope.jpg"),
        ("ijbx_face_tid_mid.txt", lambda ls: ls + ["9999.jpg 1 1"], r":73: image 9999.jpg"),
        ("ijbx_template_pair_label.txt", lambda ls: ls + ["103 777 0"], r":154: template 777"),
        ("ijbx_name_5pts_score.txt", lambda ls: ls[:4] + ["5.jpg 1 2"] + ls[5:], r":5: 3 fields"),
        ("ijbx_1N_probe_mixed.csv", lambda ls: ls + ["888,1,x.jpg"], "template 888"),
    ],
)
def test_bad_meta_names_file_and_line(ijb_root, tmp_path, name, edit, message):
    lines = lambda data: ("\n".join(edit(data.decode().splitlines())) + "\n").encode()  # noqa: E731
    root, path = _edit(ijb_root, tmp_path, name, lines)
    with pytest.raises(ValueError, match=f"{path}{message}" if message[0] == ":" else message):
        read_ijb(root, "ijbx")


def _line(n, fn):
    """Edit line ``n`` (1-based) of a file's bytes with ``fn``."""

    def edit(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[n - 1] = fn(lines[n - 1])
        return b"\n".join(lines)

    return edit


def _score(value: bytes):
    return _line(3, lambda line: line.rsplit(b" ", 1)[0] + b" " + value)


BIG = b"9223372036854775808"  # 2^63: does not fit int64
UTF8 = r": not UTF-8 text \(byte 0x{:02x} on line {}\)"


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("ijbx_name_5pts_score.txt", _score(b"nan"), r":3: detector score nan is not in \[0, 1\]"),
        ("ijbx_name_5pts_score.txt", _score(b"inf"), r":3: detector score inf is not in"),
        ("ijbx_name_5pts_score.txt", _score(b"-0.25"), r":3: detector score -0.25 is not in"),
        ("ijbx_name_5pts_score.txt", _score(b"1.5"), r":3: detector score 1.5 is not in"),
        ("ijbx_face_tid_mid.txt", _line(2, lambda x: x[:-4] + BIG), r":2: media id 9223372"),
        ("ijbx_face_tid_mid.txt", _line(2, lambda x: b"2.jpg " + BIG + b" 1"), r":2: template id"),
        ("ijbx_template_pair_label.txt", _line(4, lambda x: BIG + x[3:]), r":4: template id 922"),
        ("ijbx_1N_probe_mixed.csv", _line(3, lambda x: BIG + x[3:]), r":3: template id 92233"),
        ("ijbx_face_tid_mid.txt", _line(3, lambda x: b"\xff" + x), UTF8.format(255, 3)),
        ("ijbx_name_5pts_score.txt", _line(7, lambda x: x + b"\xe9"), UTF8.format(233, 7)),
        ("ijbx_1N_gallery_G1.csv", _line(2, lambda x: x + b"\xff"), UTF8.format(255, 2)),
    ],
)
def test_ijb_values_are_checked_with_file_and_line(ijb_root, tmp_path, name, edit, message):
    root, path = _edit(ijb_root, tmp_path, name, edit)
    with pytest.raises(ValueError, match=f"^{path}{message}"):
        read_ijb(root, "ijbx")


def test_template_whose_images_all_weigh_zero_is_an_error(ijb_root):
    ijb = read_ijb(ijb_root, "ijbx")
    ijb.scores[ijb.templates == 104] = 0.0  # scores of 0 are in range, but leave no feature
    embeddings = torch.randn(len(ijb.images), 8, generator=torch.Generator().manual_seed(0))
    usable = np.ones(len(ijb.images), dtype=bool)
    template_features(embeddings, ijb, usable, detector_score=False)  # unweighted: fine
    first = ijb.image_lines[int(np.flatnonzero(ijb.templates == 104)[0])]
    with pytest.raises(ValueError, match=f"^{first}: template 104: every usable image has"):
        template_features(embeddings, ijb, usable, detector_score=True)


def _unusable_template(rank, world_size, root):
    try:
        run_ijb(pixel_backbone(), root, "ijbx", SIZE, "cpu", dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.multiproc
def test_template_without_usable_image_stops_every_rank(tmp_path):
    root = tmp_path / "bad"
    build_ijb_set(root, yaleb(), nan_template=120)  # identity 6's 3rd template: last rank
    messages = run_ranks(2, _unusable_template, str(root), timeout_s=120)
    line = 1 + 4 * 17  # first image of the 18th template
    expected = f"ijbx_face_tid_mid.txt:{line}: template 120 has no usable image"
    assert all(m is not None and expected in m for m in messages), messages


def test_template_pair_scores_blocks_and_rank_split_match_numpy():
    from dist_cosface.eval.ijb import TemplateFeatures, template_pair_scores

    gen = np.random.default_rng(5)
    feats = numpy_normalize(gen.standard_normal((11, 6)))
    ids = np.arange(100, 111)
    pairs = gen.integers(100, 111, size=(40, 2))
    tf = TemplateFeatures(ids, torch.from_numpy(feats))
    ref = np.array([feats[a - 100] @ feats[b - 100] for a, b in pairs])
    for world_size in (1, 2, 3):
        got = np.full(len(pairs), np.nan)
        for rank in range(world_size):
            positions, scores = template_pair_scores(tf, pairs, rank, world_size, block=4)
            assert np.isnan(got[positions]).all()  # every pair scored by exactly one rank
            got[positions] = scores
        np.testing.assert_allclose(got, ref, atol=1e-12)
