"""``dist-cosface clean`` in one process: same bytes on a re-run, the DALI reader, and bad
input: one ``error:`` line naming the file or flag (exit 2 for an unusable argument, 1 for a
failure while running), and nothing written."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import clean_data as cd
from tests.engine.test_checkpoint_safety import RunsCommand, rerecord_files

pytestmark = pytest.mark.usefixtures("one_thread")
LOOSE = ["--max-angle", "40", "--duplicate-cos", "0.97", "--overlap-cos", "0.99"]
QUIET = ["--workers", "0", "--backend", "webdataset", "--batch-size", "16"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    paths = cd.write_case(root)
    _, labels, images = cd.read_samples(paths["shards"])
    model = cd.backbone()
    rows = cd.plant_rows(cd.embed_reference(model, images), labels, 1)
    paths["run"] = root / "run"
    paths["ckpt"] = cd.write_checkpoint(paths["run"], model, rows, 1)
    paths["root"] = root
    return paths


def _clean(case, out: Path, *extra: str, run=None, shards=None) -> int:
    """The exit status of ``dist-cosface clean`` (the CLI exits on a failure)."""
    from dist_cosface.cli import main

    argv = [str(run or case["run"]), str(shards or case["shards"]), str(out), *QUIET, *extra]
    try:
        return main(["clean", *argv])
    except SystemExit as exc:
        return exc.code


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cleaned(case):
    """One webdataset-reader run with the evaluation set (shared by the tests below)."""
    out = case["root"] / "cleaned"
    assert _clean(case, out, *LOOSE, "--eval-set", str(case["eval"])) == 0
    return out


def test_a_rerun_writes_the_same_bytes_and_nothing_in_place(case, cleaned, tmp_path):
    before = _tree(case["shards"])
    assert _clean(case, tmp_path / "again", *LOOSE, "--eval-set", str(case["eval"])) == 0
    first, second = _tree(cleaned), _tree(tmp_path / "again")
    assert first == second
    assert {
        "manifest.json",
        "labels.json",
        "clean_report/summary.json",
        "clean_report/histograms.png",
        "clean_report/noisy_samples.csv",
    } <= set(first)
    assert _tree(case["shards"]) == before  # the source is never touched
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary left
    summary = json.loads(first["clean_report/summary.json"])
    manifest = json.loads(first["manifest.json"])
    assert manifest["provenance"]["thresholds"] == summary["thresholds"]
    assert manifest["provenance"]["source"] == str(case["shards"].resolve())
    assert manifest["provenance"]["checkpoint"] == str(case["ckpt"].resolve())
    assert manifest["num_samples"] == summary["counts"]["kept_samples"] > 0


def test_dali_reader_gives_the_webdataset_findings(case, cleaned, tmp_path):
    pytest.importorskip("nvidia.dali")
    args = [*LOOSE, "--eval-set", str(case["eval"]), "--backend", "dali"]
    assert _clean(case, tmp_path / "dali", *args) == 0
    for name in ("noisy_samples", "duplicate_pairs", "overlap"):
        wds, dali = cd.read_report(cleaned, name), cd.read_report(tmp_path / "dali", name)
        strip = lambda rows: [
            {k: v for k, v in r.items() if k != "cos" and k != "angle_deg"}  # noqa: E731
            for r in rows
        ]
        assert strip(dali) == strip(wds), name
        for a, b in zip(dali, wds):
            assert a["cos"] == pytest.approx(b["cos"], abs=1e-3), name
    assert _tree(tmp_path / "dali")["shard-000000.tar"] == _tree(cleaned)["shard-000000.tar"]


def _edited_manifest(case, tmp_path, **changes) -> Path:
    copy = tmp_path / "shards_copy"
    shutil.copytree(case["shards"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(changes)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _damaged_run(case, tmp_path) -> Path:
    run = tmp_path / "run_copy"
    shutil.copytree(case["run"], run)
    part = next((run / "checkpoints" / "step_1").glob("__0_*.distcp"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    return run


def _crafted_run(case, tmp_path) -> Path:
    """The run with a checkpoint index that would run a command when unpickled (its CRC32
    re-recorded, as a tamperer would); the command would create ``tmp_path/marker``."""
    run = tmp_path / "run_crafted"
    shutil.copytree(case["run"], run)
    ckpt = run / "checkpoints" / "step_1"
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCommand(tmp_path / "marker")))
    rerecord_files(ckpt)
    return run


def _truncated_shard(case, tmp_path) -> Path:
    copy = tmp_path / "shards_copy"
    shutil.copytree(case["shards"], copy)
    tar = copy / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    return copy


def _empty_folder(tmp: Path) -> Path:
    (tmp / "nothing").mkdir()
    return tmp / "nothing"


BAD = {  # name -> (arguments, exit status, what the line says)
    "out exists": (lambda case, tmp: {"out": tmp / "exists"}, 2, "exists; choose a new folder"),
    "class count": (
        lambda case, tmp: {"shards": _edited_manifest(case, tmp, num_classes=9)},
        1,
        "the run has 7 classes",
    ),
    "missing run": (lambda case, tmp: {"run": tmp / "gone"}, 2, "argument run: "),
    "no checkpoint": (
        lambda case, tmp: {"run": _empty_folder(tmp)},
        1,
        "no complete checkpoint",
    ),
    "damaged checkpoint": (lambda case, tmp: {"run": _damaged_run(case, tmp)}, 1, "__0_0.distcp"),
    "crafted checkpoint": (
        lambda case, tmp: {"run": _crafted_run(case, tmp)},
        1,
        ".metadata refused: it names posix.system",
    ),
    "damaged shard": (
        lambda case, tmp: {"shards": _truncated_shard(case, tmp)},
        1,
        "shard-000002",
    ),
    "empty result": (lambda case, tmp: {"extra": ["--max-angle", "0"]}, 1, "every sample would"),
    "missing eval set": (
        lambda case, tmp: {"extra": ["--eval-set", str(tmp / "lfw.bin")]},
        2,
        "argument --eval-set: ",
    ),
    "bad threshold": (
        lambda case, tmp: {"extra": ["--duplicate-cos", "2"]},
        2,
        "--duplicate-cos: clean.duplicate_cos must be in [-1, 1)",
    ),
    "bad number": (lambda case, tmp: {"extra": ["--max-angle", "[1"]}, 2, "--max-angle: "),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_error_line_and_nothing_is_written(case, tmp_path, capsys, name):
    make, status, expected = BAD[name]
    args = make(case, tmp_path)
    out = args.get("out", tmp_path / "out")
    if name == "out exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = _clean(case, out, *args.get("extra", []), run=args.get("run"), shards=args.get("shards"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == status, err
    assert len(err) == 1 and err[0].startswith("dist-cosface clean: error: "), err
    assert expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new, no temporary
    if name == "out exists":
        assert (out / "mine.txt").read_text() == "keep"


def test_a_failure_while_writing_leaves_nothing(case, tmp_path, monkeypatch, capsys):
    import dist_cosface.clean.run as run_module

    def disk_full(*args, **kwargs):
        raise ValueError("no space left on device (simulated)")

    monkeypatch.setattr(run_module, "write_new_shards", disk_full)
    assert _clean(case, tmp_path / "out", *LOOSE) == 1
    assert "no space left" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_new_set_reads_back_through_the_training_loader(cleaned):
    from dist_cosface.data import DataConfig, build_loader
    from dist_cosface.distributed import DistContext

    cfg = DataConfig(
        backend="webdataset",
        path=str(cleaned),
        batch_size=4,
        image_size=cd.SIZE,
        num_workers=0,
        on_bad_sample="stop",
    )
    loader = build_loader(cfg, DistContext())
    labels = np.concatenate([y.numpy() for _, y in loader])
    assert len(labels) == len(loader) * 4 and labels.max() < loader.num_classes


def test_evaluation_identities_of_each_kind_of_set(tmp_path):
    """Identities recovered from a .bin, a pairs file and an IJB release (no embedding)."""
    from dist_cosface.clean.evalsets import load_eval_set, load_ijb_identities
    from dist_cosface.eval.bin_file import write_bin
    from tests.eval_sets import build_ijb_set, yaleb

    a, b, c = cd._render([0, 0, 1], seed=9)
    # pairs: (a, b) same, (a, c) different, (b, a) same again: a is one image however often
    write_bin(tmp_path / "x.bin", [a, b, a, c, b, a], [True, False, True])
    got = load_eval_set(tmp_path / "x.bin")
    assert len(got.images) == 3 and got.owner == [0, 0, 1]
    for name in ("alice", "bob"):
        (tmp_path / "lfw" / name).mkdir(parents=True)
        for n in (1, 2):
            (tmp_path / "lfw" / name / f"{name}_{n:04d}.jpg").write_bytes(a if n == 1 else b)
    (tmp_path / "lfw" / "pairs.txt").write_text("alice 1 2\nalice 1 bob 1\nbob 1 bob 2\n")
    got = load_eval_set(tmp_path / "lfw")
    assert sorted(got.identities) == ["alice", "bob"] and len(got.images) == 4
    assert [got.identities[o] for o in got.owner] == [p.parent.name for p in got.images]
    truth = build_ijb_set(tmp_path / "ijb", yaleb())
    got = load_ijb_identities(tmp_path / "ijb", "ijbx")
    assert sorted(got.identities) == [f"subject{s}" for s in sorted(set(truth["subject"].values()))]
    lines = (tmp_path / "ijb" / "meta" / "ijbx_face_tid_mid.txt").read_text().split("\n")
    templates = [int(line.split()[1]) for line in lines if line.strip()]
    want = [f"subject{truth['subject'][t]}" for t in templates]
    assert [got.identities[o] for o in got.owner] == want


def test_centers_of_a_trained_sub_center_head_are_its_rows(tmp_path):
    """What the trainer writes with ``classifier.subcenters: 2`` is what clean reads: every
    class's two rows, normalised, in the head's order."""
    from dist_cosface.clean.centers import load_centers
    from dist_cosface.distributed import DistContext
    from dist_cosface.engine import train
    from dist_cosface.engine.checkpoint.manager import read_meta
    from dist_cosface.engine.checkpoint.reader import merge_classifier
    from tests.tiny import tiny_config

    cfg = tiny_config(
        tmp_path / "run",
        "classifier.subcenters=2",
        "train.total_steps=1",
        "checkpoint.every_steps=1",
    )
    train(cfg, DistContext())
    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    meta = read_meta(ckpt)
    assert meta["num_subcenters"] == 2
    centers = load_centers(ckpt, meta, cfg.model.embedding_size, DistContext())
    saved = merge_classifier(ckpt)["weight"]  # [C, 2, D]
    assert centers.rows.shape == (cfg.classifier.num_classes, 2, cfg.model.embedding_size)
    expected = saved / saved.norm(dim=-1, keepdim=True)
    assert torch.allclose(centers.rows, expected, atol=1e-6)
