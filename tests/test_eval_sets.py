"""Verification sets (.bin, pairs.txt, generated) and end-to-end evaluation of a backbone."""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

from dist_cosface.eval import (
    EvalConfig,
    evaluate,
    load_bin,
    load_pairs,
    load_target,
    load_targets,
    make_verification_set,
    run_evaluation_all_ranks,
    write_bin,
)
from dist_cosface.eval.pair_verification import embed_set
from tests.eval_sets import png_bytes


def random_png(seed: int, size: int = 8) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size, size, 3)))


def py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's pickle.dump((images, issame), f, 2) writes: images as BINSTRING (str)."""
    out = b"\x80\x02]("  # PROTO 2, EMPTY_LIST, MARK
    for data in images:
        out += b"T" + struct.pack("<i", len(data)) + data  # BINSTRING
    out += b"e]("  # APPENDS, EMPTY_LIST, MARK
    out += b"".join(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
    return out + b"e\x86."  # APPENDS, TUPLE2, STOP


def test_bin_round_trip(tmp_path):
    images = [random_png(i) for i in range(6)]
    path = write_bin(tmp_path / "lfw.bin", images, [True, False, True])
    vset = load_bin(path)
    assert vset.name == "lfw" and vset.num_pairs == 3
    assert vset.images == images and vset.issame == [True, False, True]


def test_bin_written_by_python3_protocol_2(tmp_path):
    # Python 3 writes bytes under protocol 2 as a call to _codecs.encode(text, "latin1").
    images = [random_png(i) for i in range(4)]
    raw = pickle.dumps((images, [False, True]), protocol=2)
    assert b"_codecs" in raw
    (tmp_path / "p2.bin").write_bytes(raw)
    vset = load_bin(tmp_path / "p2.bin")
    assert vset.images == images and vset.issame == [False, True]


def test_bin_written_by_python2(tmp_path):
    images = [random_png(i) for i in range(4)]
    (tmp_path / "py2.bin").write_bytes(py2_pickle(images, [True, False]))
    vset = load_bin(tmp_path / "py2.bin")
    assert vset.images == images and vset.issame == [True, False]


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_bin_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = ([_RunsShell(f"touch {marker}")], [True])
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match=r"evil\.bin.*refusing to load global (posix|nt)\.system"):
        load_bin(path)
    assert not marker.exists()


def test_codecs_encode_is_allowed_only_for_latin1(tmp_path):
    # _codecs.encode("x", "zlib"): allowed global, forbidden codec.
    raw = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."
    (tmp_path / "codec.bin").write_bytes(raw)
    with pytest.raises(ValueError, match=r"codec\.bin.*'zlib'"):
        load_bin(tmp_path / "codec.bin")


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"images": []}, "expected a pickled"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", "text"], [True]), "image 1 is str"),
        (([b"a", b"b"], ["yes"]), r"issame\[0\]"),
    ],
)
def test_bin_structure_errors_name_the_file(tmp_path, payload, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(ValueError, match=message) as info:
        load_bin(path)
    assert "bad.bin" in str(info.value)


def test_truncated_and_missing_bin(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])
    with pytest.raises(ValueError, match="cut.bin"):
        load_bin(path)
    with pytest.raises(ValueError, match="not found"):
        load_target(tmp_path / "absent.bin")


def make_lfw_folder(root):
    for name, count in (("alice", 2), ("bob", 1)):
        (root / name).mkdir(parents=True)
        for i in range(1, count + 1):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(random_png(len(name) * 10 + i))


def test_lfw_pairs_txt(tmp_path):
    make_lfw_folder(tmp_path)
    (tmp_path / "pairs.txt").write_text("1\t2\nalice\t1\t2\n# comment\n\nalice 2 bob 1\n")
    vset = load_target(tmp_path)
    assert vset.name == tmp_path.name and vset.issame == [True, False]
    names = [p.relative_to(tmp_path).as_posix() for p in vset.images]
    assert names == [
        "alice/alice_0001.jpg",
        "alice/alice_0002.jpg",
        "alice/alice_0002.jpg",
        "bob/bob_0001.jpg",
    ]
    assert vset.read_image_bytes(3) == (tmp_path / "bob" / "bob_0001.jpg").read_bytes()


def test_path_label_pairs_file_with_separate_root(tmp_path):
    make_lfw_folder(tmp_path / "imgs")
    pairs = tmp_path / "my_pairs.txt"
    pairs.write_text("alice/alice_0001.jpg bob/bob_0001.jpg 0\nalice/alice_0001.jpg x.jpg 1\n")
    with pytest.raises(ValueError, match=r"my_pairs\.txt:2: image not found"):
        load_pairs(pairs, tmp_path / "imgs")
    pairs.write_text("alice/alice_0001.jpg bob/bob_0001.jpg 0\n")
    vset = load_pairs(pairs, tmp_path / "imgs")
    assert vset.name == "my_pairs" and vset.issame == [False]


def test_bad_pairs_lines(tmp_path):
    make_lfw_folder(tmp_path)
    (tmp_path / "pairs.txt").write_text("alice 1 2\nalice 1 bob\n")
    with pytest.raises(ValueError, match=r"pairs\.txt:2"):
        load_target(tmp_path)
    (tmp_path / "pairs.txt").write_text("alice one 2\n")
    with pytest.raises(ValueError, match=r"pairs\.txt:1: image index 'one'"):
        load_target(tmp_path)


def make_identity_folder(root, num_ids=5, per_id=3, size=16):
    """Identity k: a fixed random pattern; its images add small noise to it."""
    rng = np.random.default_rng(0)
    for k in range(num_ids):
        pattern = rng.integers(0, 256, (size, size, 3))
        (root / f"id{k}").mkdir(parents=True)
        for j in range(per_id):
            noisy = np.clip(pattern + rng.integers(-8, 9, pattern.shape), 0, 255)
            (root / f"id{k}" / f"{j}.png").write_bytes(png_bytes(noisy))
    return {
        (root / f"id{k}" / f"{j}.png").read_bytes(): f"id{k}"
        for k in range(num_ids)
        for j in range(per_id)
    }


def test_make_verification_set_is_balanced_and_reproducible(tmp_path):
    owner = make_identity_folder(tmp_path / "faces")
    path = make_verification_set(tmp_path / "faces", tmp_path / "held.bin", 12, seed=3)
    vset = load_bin(path)
    assert vset.num_pairs == 12 and sum(vset.issame) == 6
    for i, same in enumerate(vset.issame):
        a, b = vset.images[2 * i], vset.images[2 * i + 1]
        assert (owner[a] == owner[b]) == same
        assert a != b  # a same pair never compares an image with itself
    again = make_verification_set(tmp_path / "faces", tmp_path / "again.bin", 12, seed=3)
    assert again.read_bytes() == path.read_bytes()
    other = make_verification_set(tmp_path / "faces", tmp_path / "other.bin", 12, seed=4)
    assert other.read_bytes() != path.read_bytes()


def test_make_verification_set_restricts_identities(tmp_path):
    owner = make_identity_folder(tmp_path / "faces")
    path = make_verification_set(tmp_path / "faces", tmp_path / "h.bin", 10, 0, ["id3", "id1"])
    assert {owner[img] for img in load_bin(path).images} == {"id1", "id3"}
    with pytest.raises(ValueError, match="'id9' not found"):
        make_verification_set(tmp_path / "faces", tmp_path / "x.bin", 10, 0, ["id9", "id1"])
    with pytest.raises(ValueError, match="need >= 2 identities"):
        make_verification_set(tmp_path / "faces", tmp_path / "x.bin", 10, 0, ["id1"])


class PoolEmbedder(nn.Module):
    """A parameter-free 'backbone': 4x4 average pooling, flattened (48-d)."""

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1)


def test_embed_set_preprocessing_and_flip_match_numpy_reference(tmp_path):
    pixels = [np.random.default_rng(i).integers(0, 256, (12, 12, 3)) for i in range(2)]
    write_bin(tmp_path / "t.bin", [png_bytes(p) for p in pixels], [True])
    backbone = nn.Sequential(nn.Flatten()).train()
    got = embed_set(backbone, load_bin(tmp_path / "t.bin"), 12, "cpu", batch_size=1, flip=True)
    assert backbone.training  # the caller's mode is restored
    for row, p in zip(got.double().numpy(), pixels):
        chw = (p.astype(np.float64) / 127.5 - 1.0).transpose(2, 0, 1)
        ref = (chw + chw[:, :, ::-1]).ravel()  # flip test: image + mirror image
        np.testing.assert_allclose(row, ref / np.linalg.norm(ref), atol=1e-6)
    # Resizing to a different input size happens before the backbone.
    assert embed_set(backbone, load_bin(tmp_path / "t.bin"), 8, "cpu").shape == (2, 3 * 8 * 8)


def test_embed_set_feeds_half_precision_backbones_in_their_dtype(tmp_path):
    pixels = [np.random.default_rng(i).integers(0, 256, (8, 8, 3)) for i in range(2)]
    write_bin(tmp_path / "t.bin", [png_bytes(p) for p in pixels], [True])
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
    half = copy.deepcopy(reference).to(torch.bfloat16)
    vset = load_bin(tmp_path / "t.bin")
    got = embed_set(half, vset, 8, "cpu", flip=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, embed_set(reference, vset, 8, "cpu", flip=False), atol=0.03, rtol=0
    )


def test_evaluate_and_run_evaluation_in_one_process_end_to_end(tmp_path):
    make_identity_folder(tmp_path / "faces", num_ids=6, per_id=3)
    make_verification_set(tmp_path / "faces", tmp_path / "held.bin", 40, seed=0)
    make_lfw_folder(tmp_path / "lfw")
    (tmp_path / "lfw" / "pairs.txt").write_text("alice 1 2\nalice 1 bob 1\n" * 2)
    cfg = EvalConfig(targets=[str(tmp_path / "held.bin"), str(tmp_path / "lfw")], n_folds=4)
    result = evaluate(PoolEmbedder(), str(tmp_path / "held.bin"), cfg, "cpu", 16)
    # Same-identity images differ by small noise, different identities by unrelated patterns.
    assert result["accuracy"] == 1.0 and result["roc_auc"] == pytest.approx(1.0)
    assert result["num_pairs"] == 40 and set(result["tar_at_far"]) == {1e-3, 1e-2}
    assert len(result["fold_accuracies"]) == 4

    out = run_evaluation_all_ranks(PoolEmbedder(), cfg, "cpu", 16, tmp_path / "out")
    assert set(out) == {"held", "lfw"}
    assert out["held"]["accuracy"] == result["accuracy"]
    for name in ("held", "lfw"):
        assert (tmp_path / "out" / f"roc_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["held"]["tar_at_far"]["0.001"] == 1.0
    with pytest.raises(ValueError, match=r"pairs\.txt: 4 pairs < eval\.n_folds=10"):
        evaluate(PoolEmbedder(), str(tmp_path / "lfw"), EvalConfig(), "cpu", 16)


def test_one_process_evaluation_keeps_going_past_failing_targets(tmp_path):
    make_identity_folder(tmp_path / "faces", num_ids=6, per_id=3)
    make_verification_set(tmp_path / "faces", tmp_path / "held.bin", 40, seed=0)
    missing, short = tmp_path / "missing.bin", tmp_path / "short.bin"
    write_bin(short, [random_png(0), random_png(1)], [True])  # 1 pair < n_folds
    targets = [str(missing), str(tmp_path / "held.bin"), str(short)]
    cfg = EvalConfig(targets=targets, n_folds=4, roc_png=False)
    out = run_evaluation_all_ranks(PoolEmbedder(), cfg, "cpu", 16, tmp_path / "o", keep_going=True)
    assert out["held"]["accuracy"] == 1.0 and "roc_png" not in out["held"]
    failed = out[str(missing)]
    assert failed["target"] == str(missing) and "missing.bin" in failed["error"]
    assert "1 pairs < eval.n_folds=4" in out["short"]["error"]
    assert json.loads((tmp_path / "o" / "eval.json").read_text()) == json.loads(json.dumps(out))
    assert not list((tmp_path / "o").glob("*.png"))
    with pytest.raises(ValueError, match="missing.bin"):  # without keep_going: the first failure
        run_evaluation_all_ranks(PoolEmbedder(), cfg, "cpu", 16, tmp_path / "p")
    assert not (tmp_path / "p" / "eval.json").exists()


def test_load_targets_rejects_duplicate_names(tmp_path):
    write_bin(tmp_path / "a" / "x.bin", [random_png(0), random_png(1)], [False])
    write_bin(tmp_path / "b" / "x.bin", [random_png(0), random_png(1)], [False])
    cfg = EvalConfig(targets=[str(tmp_path / "a" / "x.bin"), str(tmp_path / "b" / "x.bin")])
    with pytest.raises(ValueError, match="two targets are named 'x'"):
        load_targets(cfg)


def test_make_pairs_tool(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "make_pairs.py"
    spec = importlib.util.spec_from_file_location("make_pairs", tool)
    make_pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_pairs)
    owner = make_identity_folder(tmp_path / "faces")
    (tmp_path / "held.txt").write_text("id0\nid2\n\n")
    argv = [str(tmp_path / "faces"), str(tmp_path / "h.bin"), "--num-pairs", "8"]
    assert make_pairs.main(argv + ["--identities-file", str(tmp_path / "held.txt")]) == 0
    assert "8 pairs (4 same)" in capsys.readouterr().out
    assert {owner[img] for img in load_bin(tmp_path / "h.bin").images} == {"id0", "id2"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_embeddings_on_gpu_match_cpu(tmp_path):
    from dist_cosface.models import ModelConfig, build_backbone

    make_identity_folder(tmp_path / "faces", size=32)
    vset = load_bin(make_verification_set(tmp_path / "faces", tmp_path / "g.bin", 8, seed=0))
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name="iresnet18", input_size=32)).eval()
    cpu = embed_set(model, vset, 32, "cpu", batch_size=4)
    gpu = embed_set(model.cuda(), vset, 32, "cuda", batch_size=4)
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)  # TF32 convolutions on the GPU
