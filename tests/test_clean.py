"""``dist-cosface clean`` on 1, 2 and 3 gloo ranks: every finding and the new shard set equal a
brute-force numpy reference (tests/clean_data.py), with one and with two sub-centers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests import clean_data as cd
from tests.multiproc import on_subgroups, run_ranks

SUBCENTERS = (1, 2)


def _config(thresholds: dict):
    from dist_cosface.clean.config import CleanConfig

    # search_k=1 and tiny chunks: the adaptive k and the chunked scoring are exercised
    return CleanConfig(
        **thresholds,
        backend="webdataset",
        num_workers=0,
        batch_size=16,
        search_k=1,
        chunk_size=2,
        shard_size=9,
    )


def _clean_on_subgroups(rank: int, world_size: int, root: Path, thresholds: dict) -> None:
    import importlib

    for heavy in ("torch.distributed.checkpoint", "webdataset"):  # all ranks at once, not in turn
        importlib.import_module(heavy)
    from dist_cosface.clean import samples, search
    from dist_cosface.clean.run import CleanJob, clean
    from dist_cosface.distributed import context_from_group

    # tiny rounds and score blocks: several all-to-all rounds and query chunks run
    samples.ROUTE_ROWS, search.SCORE_BLOCK = 7, 6

    def run(group):
        size = 1 if group is None else dist.get_world_size(group)
        ctx = context_from_group(group, torch.device("cpu"))
        for k in SUBCENTERS:
            evals = [str(root / "eval")]
            job = CleanJob(
                str(root / f"run_k{k}"),
                str(root / "shards"),
                str(root / f"out_k{k}_w{size}"),
                evals,
            )
            clean(job, _config(thresholds[k]), ctx)

    on_subgroups(rank, world_size, run)


def _case(root: Path) -> tuple[dict, dict]:
    """Shards, eval folders, both checkpoints; the reference and thresholds per K."""
    from dist_cosface.engine.checkpoint.reader import read_value

    paths = cd.write_case(root)
    keys, labels, images = cd.read_samples(paths["shards"])
    model = cd.backbone()
    emb = cd.embed_reference(model, images)
    eval_images = sorted((root / "eval").glob("*/*.png"))
    eval_emb = cd.embed_reference(model, eval_images)
    owner = np.asarray([0 if p.parent.name == "alice" else 1 for p in eval_images])
    eval_means = cd._unit(np.stack([eval_emb[owner == i].mean(0) for i in (0, 1)]))
    refs, thresholds = {}, {}
    for k in SUBCENTERS:
        ckpt = cd.write_checkpoint(root / f"run_k{k}", model, cd.plant_rows(emb, labels, k), k)
        rows = cd._unit(read_value(ckpt, "classifier.weight").double().numpy())  # as stored
        t = _thresholds(emb, labels, rows, k, eval_means)
        refs[k], thresholds[k] = cd.reference(emb, labels, rows, k, eval_means, t), t
    refs["keys"], refs["labels"] = keys, labels
    return refs, thresholds


def _thresholds(emb, labels, rows, k, eval_means) -> dict:
    """Thresholds in wide gaps of the reference's own scores, so float32 vs float64 rounding
    cannot move a decision, and every finding is non-empty."""
    loose = {
        "max_angle": 180.0,
        "min_dominant_share": 0.0,
        "duplicate_cos": 0.99,
        "overlap_cos": 0.99,
    }
    ref = cd.reference(emb, labels, rows, k, eval_means, loose)
    off = ref["center_cos"][np.triu_indices(cd.NUM_CLASSES, 1)]
    share = ref["share"]
    scores = (eval_means @ ref["centers"].T).ravel()
    return {
        "max_angle": cd.threshold_in_gap(ref["angle"], *np.percentile(ref["angle"], [60, 90])),
        "min_dominant_share": cd.threshold_in_gap(share, 0.0) if k > 1 else 0.5,
        "duplicate_cos": cd.threshold_in_gap(off, np.median(off)),
        "overlap_cos": cd.threshold_in_gap(scores, np.percentile(scores, 75)),
    }


@pytest.mark.multiproc
def test_findings_and_new_set_equal_the_reference_on_1_2_3_ranks(tmp_path):
    refs, thresholds = _case(tmp_path)
    run_ranks(3, _clean_on_subgroups, tmp_path, thresholds, timeout_s=240)
    for k in SUBCENTERS:
        ref = refs[k]
        for size in (1, 2, 3):
            out = tmp_path / f"out_k{k}_w{size}"
            where = f"K={k}, {size} ranks"
            _check_findings(out, ref, k, where)
            _check_new_set(out, ref, refs, where)
        # the new set does not depend on the number of ranks (same bytes)
        for name in ("manifest.json", "labels.json", "shard-000000.tar", "shard-000000.idx"):
            first = (tmp_path / f"out_k{k}_w1" / name).read_bytes()
            for size in (2, 3):
                assert (tmp_path / f"out_k{k}_w{size}" / name).read_bytes() == first, (k, name)


def _check_findings(out: Path, ref: dict, k: int, where: str) -> None:
    noisy = cd.read_report(out, "noisy_samples")
    assert {r["sample"] for r in noisy} == ref["noisy"] and ref["noisy"], where
    for r in noisy:
        assert r["cos"] == pytest.approx(ref["score"][r["sample"]], abs=1e-4), where
    low = cd.read_report(out, "low_share_classes")
    assert {r["class"] for r in low} == ref["low_share"], where
    assert bool(ref["low_share"]) == (k > 1), where
    for r in low:
        assert r["share"] == pytest.approx(ref["share"][r["class"]], abs=1e-6), where
    pairs = cd.read_report(out, "duplicate_pairs")
    assert {(r["class_a"], r["class_b"]) for r in pairs} == ref["pairs"] and ref["pairs"], where
    for r in pairs:
        want = ref["center_cos"][r["class_a"], r["class_b"]]
        assert r["cos"] == pytest.approx(want, abs=1e-5), where
    sets = cd.read_report(out, "merge_sets")
    assert [r["classes"] for r in sets] == ref["merge_sets"], where
    overlap = cd.read_report(out, "overlap")
    names = ["alice", "bob"]
    got = {(names.index(r["identity"]), r["class"]) for r in overlap}
    assert got == ref["overlap"], where
    assert ref["overlap"], where
    summary = json.loads((out / "clean_report" / "summary.json").read_text())
    assert sum(summary["histograms"]["angles"]["counts"]) == len(ref["angle"]), where
    assert summary["counts"]["noisy_samples"] == len(ref["noisy"]), where


def _check_new_set(out: Path, ref: dict, refs: dict, where: str) -> None:
    from dist_cosface.data.dataset import open_shards

    keys, labels, _ = cd.read_samples(out)
    got = dict(zip(keys, labels.tolist()))
    assert got == cd.expected_output(ref, refs["labels"], refs["keys"]), where
    assert keys == sorted(keys, key=refs["keys"].index), where  # source order kept
    shards = open_shards(str(out), "stop")  # the loaders accept it
    assert shards.manifest.num_classes == len(set(got.values())), where
    provenance = shards.manifest.provenance
    assert provenance["thresholds"]["max_angle"] > 0 and provenance["removed"], where
