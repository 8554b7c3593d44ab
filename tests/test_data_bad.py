"""Loaders facing bad input: skip-and-count or stop naming shard and key; never a hang."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import torch.distributed as dist

from dist_cosface.data import build_loader
from dist_cosface.distributed import DistContext, context_from_group
from tests.data_common import (
    BACKENDS,
    bad_data_config,
    good_sample,
    jpeg_bytes,
    loader_config,
    one_epoch,
    small_dataset,
)
from tests.multiproc import run_ranks

BAD_SAMPLES = {
    "label out of range": (
        {3: good_sample(3, label=9)},
        r"shard-000000.tar.*000003.*outside \[0, 4\)",
    ),
    "unparsable label": ({5: {"jpg": jpeg_bytes(5), "cls": b"five"}}, r"shard-000000.tar.*000005"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_label_skip_or_stop(tmp_path, backend, case):
    bad, message = BAD_SAMPLES[case]
    small_dataset(tmp_path, bad)
    loader, labels, batches = one_epoch(backend, tmp_path)
    assert len(batches) == 4 and all(b[0].shape[0] == 4 for b in batches)
    assert int(labels.min()) >= 0 and int(labels.max()) < 4
    assert loader.stats["skipped_samples"] >= 1
    with pytest.raises(ValueError, match=message):
        one_epoch(backend, tmp_path, "stop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_skipped_or_stops(tmp_path, backend):
    """A truncated JPEG and one with garbage after its start marker: each replaced in its batch
    by a good sample (DALI: never given to the decoder), logged and counted; or the stop."""
    jpg = jpeg_bytes(6)
    bad = {
        6: {"jpg": jpg[: len(jpg) // 3], "cls": b"2"},
        10: {"jpg": b"\xff\xd8garbage", "cls": b"1"},
    }
    small_dataset(tmp_path, bad)
    loader, labels, batches = one_epoch(backend, tmp_path)
    assert len(batches) == 4 and loader.stats["skipped_samples"] == 2
    assert all(float(image.std()) > 0.1 for b in batches for image in b[0])  # no placeholder
    named = r"shard-00000[01].tar( key |:\d+:)0000(06|10)(.jpg)?: corrupt image"
    with pytest.raises(ValueError, match=named):
        one_epoch(backend, tmp_path, "stop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_without_cls(tmp_path, backend):
    small_dataset(tmp_path, {9: {"jpg": jpeg_bytes(9)}})
    loader, labels, batches = one_epoch(backend, tmp_path)
    assert loader.stats["skipped_samples"] == 1 and len(batches) == 3  # 15 usable // 4
    with pytest.raises(ValueError, match=r"shard-000001.tar: key 000009: sample without .cls"):
        one_epoch(backend, tmp_path, "stop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_tar(tmp_path, backend):
    small_dataset(tmp_path, {}, n=24)
    tar = tmp_path / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1500])
    loader, labels, batches = one_epoch(backend, tmp_path)
    assert loader.stats == {"skipped_samples": 8, "bad_shards": 1} and len(batches) == 4
    with pytest.raises(ValueError, match=r"shard-000001.tar: truncated tar"):
        one_epoch(backend, tmp_path, "stop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifest_disagrees_with_shards(tmp_path, backend):
    small_dataset(tmp_path, {})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["num_samples"] = 12
    manifest["num_samples"] = 20
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loader, labels, batches = one_epoch(backend, tmp_path)
    assert len(batches) == 4 and loader.stats["bad_shards"] == 1  # the index is the truth
    with pytest.raises(ValueError, match=r"shard-000001.tar: manifest says 12 samples, index"):
        one_epoch(backend, tmp_path, "stop")
    manifest["num_samples"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json: num_samples=99 but shards hold 20"):
        one_epoch(backend, tmp_path)


def _step_in_lockstep(rank, world_size, path):
    """Each rank all-reduces once per batch: unequal batch counts would hang here."""
    group = torch.distributed.group.WORLD
    ctx = context_from_group(group, torch.device("cpu"))
    loader = build_loader(bad_data_config("webdataset", path), ctx)
    steps = torch.zeros(1)
    for _ in loader:
        steps += 1
        torch.distributed.all_reduce(torch.ones(1), group=group)
    return int(steps), loader.stats["skipped_samples"]


@pytest.mark.multiproc
def test_ranks_with_different_bad_counts_stay_in_lockstep(tmp_path):
    bad = {i: good_sample(i, label=7) for i in (0, 1, 2, 3, 4)}  # all in shard 0 -> one rank
    small_dataset(tmp_path, bad, n=32, shard_size=8)
    results = run_ranks(2, _step_in_lockstep, str(tmp_path), timeout_s=120)
    # the rank holding shard 0 has 11 usable samples for 4 batches of 4: it wraps around
    # (meeting the bad samples again) instead of running dry while the other rank waits
    assert results[0][0] == results[1][0] == 4
    skipped = sorted(r[1] for r in results)
    assert skipped[0] == 0 and skipped[1] >= 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_count_once_per_epoch_and_key(tmp_path, backend):
    """2 bad labels in 256 samples (0.78%) under max_skip_fraction 0.01. The
    webdataset stream of a rank short of good samples re-reads the shard within the epoch and
    meets both again: still 2 losses, and the run goes on."""
    bad = {0: good_sample(0, label=9), 1: good_sample(1, label=9)}
    small_dataset(tmp_path, bad, n=256, shard_size=256)
    cfg = bad_data_config(backend, tmp_path, max_skip_fraction=0.01)
    loader = build_loader(cfg, DistContext())
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert len(list(loader)) == 64
        assert loader.stats["skipped_samples"] == 2 * (epoch + 1)  # cumulative, 2 per epoch


def _zeroed_after_header(jpg: bytes) -> bytes:
    """A JPEG's bytes after its JFIF header (SOI + APP0, 20 bytes) zeroed: the same
    size, so every start-up check passes."""
    return jpg[:20] + bytes(len(jpg) - 20)


CORRUPT_KEYS = (5, 50, 130)  # in shard 0; each in the first half of its batch of 40


def _epoch_of_each_loader(rank, world_size, path):
    """Both loaders with the quickstart's decoding settings (no workers, so one DALI thread;
    32 px): steps, losses and the losses' log lines of one epoch, ranks in lockstep."""
    group = dist.group.WORLD
    ctx = context_from_group(group, torch.device("cpu"))
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("dist_cosface.data.integrity").addHandler(handler)
    out = {}
    for backend in BACKENDS:
        # shuffle_buffer 1: each rank reads exactly its part (DALI) or shard (webdataset)
        cfg = loader_config(
            backend, path, batch_size=40, num_workers=0, random_flip=True, shuffle_buffer=1
        )
        loader = build_loader(cfg, ctx)
        logged.clear()
        steps = 0
        for _ in loader:
            dist.all_reduce(torch.ones(1), group=group)
            steps += 1
        lines = sorted(line for line in logged if "corrupt image" in line)
        out[backend] = steps, loader.stats["skipped_samples"], lines
    return out


@pytest.mark.multiproc
def test_corrupt_images_skipped_by_both_loaders_on_two_ranks(tmp_path):
    """3 of 400 samples zeroed after the header, max_skip_fraction 0.01: both loaders skip
    them and the run goes on (DALI's decoder must never see them: it fails the batch, or dies
    with SIGSEGV with num_workers 0)."""
    bad = {i: {"jpg": _zeroed_after_header(jpeg_bytes(i)), "cls": b"1"} for i in CORRUPT_KEYS}
    small_dataset(tmp_path, bad, n=400, shard_size=200)
    results = run_ranks(2, _epoch_of_each_loader, str(tmp_path), timeout_s=240)
    for backend in BACKENDS:
        (steps0, lost0, lines0), (steps1, lost1, lines1) = (r[backend] for r in results)
        assert steps0 == steps1 == 5, backend  # 200 samples a rank, batches of 40
        assert (lost0, lost1) == (3, 0), backend  # rank 0 reads shard 0, once per key
        assert len(lines0) == 3 and not lines1, backend
        for key in CORRUPT_KEYS:  # each logged with its shard and key
            named = rf"shard-000000.tar( key |:\d+:)000{key:03d}\b"
            assert sum(bool(re.search(named, line)) for line in lines0) == 1, lines0
