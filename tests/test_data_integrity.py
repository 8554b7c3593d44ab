"""Manifests cannot run commands, and no bad shard or sample is lost silently.

Each case is rebuilt on small hand-made shards: a shell payload as a
shard name, a truncated shard, a missing tar, an index cut short, an edited num_classes, a tar
with one zeroed 512-byte header, swapped index files, and a bad shard that only one of two
gloo ranks reads.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from dist_cosface.data import DataConfig, build_loader
from dist_cosface.data.locations import open_stream
from dist_cosface.data.shards import Manifest, read_index
from dist_cosface.distributed import DistContext, context_from_group
from tests.data_common import (
    BACKENDS,
    bad_data_config,
    good_sample,
    loader_config,
    one_epoch,
    small_dataset,
    write_dataset,
)
from tests.multiproc import run_ranks

# ---------------------------------------------------------------- shell payloads


def _payload(tmp_path) -> tuple[str, object]:
    marker = tmp_path / "marker"
    return f"shard-000000.tar; touch {marker}; cat shard-000000.tar", marker


def _rename_shard(path, new_name: str) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"][0]["name"] = new_name
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("backend", "via_pipe"), [("webdataset", True), ("webdataset", False), ("dali", False)]
)
def test_shell_payload_shard_name_is_refused_and_never_run(tmp_path, backend, via_pipe):
    small_dataset(tmp_path, {})
    payload, marker = _payload(tmp_path)
    _rename_shard(tmp_path, payload)
    path = f"pipe:cat {tmp_path / 'manifest.json'}" if via_pipe else tmp_path
    with pytest.raises(ValueError, match=r"manifest.json: shard name 'shard-000000.tar; touch"):
        build_loader(bad_data_config(backend, path), DistContext())
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    [
        "../shard-000000.tar",
        "sub/shard-000000.tar",
        "/etc/shard.tar",
        "shard 0.tar",
        "shard-0.tar\n",
        "$(id).tar",
        "`id`.tar",
        "shard'.tar",
        "shard|x.tar",
        "shard..x.tar",
        ".hidden.tar",
        "shard-000000.idx",
        "",
        7,
    ],
)
def test_only_plain_shard_names_pass(name):
    manifest = Manifest(4, 8, [])
    raw = json.loads(manifest.to_json())
    raw["shards"] = [{"name": name, "num_samples": 8}]
    with pytest.raises(ValueError, match=r"m.json: shard name .* is not a plain file name"):
        Manifest.from_json(json.dumps(raw), "m.json")
    raw["shards"] = [{"name": "shard-000000.tar", "num_samples": 8}]
    assert Manifest.from_json(json.dumps(raw), "m.json").shards[0].name == "shard-000000.tar"
    raw["label_map"] = "../labels.json"
    with pytest.raises(ValueError, match=r"m.json: label_map '../labels.json'"):
        Manifest.from_json(json.dumps(raw), "m.json")


def test_pipe_path_reads_shards_without_a_shell(tmp_path):
    small_dataset(tmp_path, {})
    loader, labels, batches = one_epoch("webdataset", f"pipe:cat {tmp_path / 'manifest.json'}")
    _, local_labels, _ = one_epoch("webdataset", tmp_path)
    assert len(batches) == 4 and sorted(labels.tolist()) == sorted(local_labels.tolist())
    assert loader.stats["skipped_samples"] == 0


def test_missing_remote_shard_is_a_named_shortfall(tmp_path):
    small_dataset(tmp_path, {}, n=32)
    (tmp_path / "shard-000002.tar").unlink()  # cannot be checked before reading when remote
    path = f"pipe:cat {tmp_path / 'manifest.json'}"
    shortfall = r"shard-000002.tar: read 0 of the 8 samples expected \(.*exited with status 1"
    with pytest.raises(ValueError, match=shortfall + r".*on_bad_sample=stop"):
        one_epoch("webdataset", path, "stop")
    with pytest.raises(ValueError, match=shortfall + r".*max_skip_fraction=0.01"):
        one_epoch("webdataset", path, max_skip_fraction=0.01)
    loader, _, batches = one_epoch("webdataset", path, max_skip_fraction=0.3)
    # remote: the epoch length comes from the manifest (32 // 4), the stream wraps around
    assert loader.stats == {"skipped_samples": 8, "bad_shards": 1} and len(batches) == 8


def test_pipe_command_shell_syntax_refused_and_failures_named(tmp_path):
    marker = tmp_path / "marker"
    for command in [f"pipe:cat x; touch {marker}", "pipe:cat x | gzip", f"pipe:touch $({marker})"]:
        with pytest.raises(ValueError, match=r"run without a shell; shell syntax"):
            open_stream(command)
    with pytest.raises(ValueError, match=r"run without a shell; shell syntax '\|'"):
        DataConfig(backend="webdataset", path="pipe:curl http://h/manifest.json | cat")
    assert not marker.exists()
    missing = f"pipe:cat {tmp_path / 'nothing' / 'manifest.json'}"
    with pytest.raises(OSError, match=r"nothing/manifest.json: command exited with status 1"):
        build_loader(bad_data_config("webdataset", missing), DistContext())


# ---------------------------------------------------------------- damaged shard sets


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_shard_stops_by_default_and_is_logged_when_allowed(tmp_path, backend, caplog):
    small_dataset(tmp_path, {}, n=64)  # 8 shards: one is 12.5% of the data
    tar = tmp_path / "shard-000003.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"8 of 64 samples \(12.5%\).*max_skip_fraction=0.01: .*"):
        one_epoch(backend, tmp_path, max_skip_fraction=0.01)
    with caplog.at_level(logging.WARNING):
        loader, _, batches = one_epoch(backend, tmp_path, max_skip_fraction=0.2)
    assert loader.stats == {"skipped_samples": 8, "bad_shards": 1} and len(batches) == 14
    assert "shard-000003.tar: truncated tar" in _warnings(caplog)
    assert "epoch 0: 8 of 64 samples lost (12.50%)" in _warnings(caplog)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_tar_is_named_and_counted(tmp_path, backend, caplog):
    small_dataset(tmp_path, {}, n=32)
    (tmp_path / "shard-000002.tar").unlink()
    with pytest.raises(ValueError, match=r"shard-000002.tar: shard or its index .* missing"):
        one_epoch(backend, tmp_path, "stop")
    with pytest.raises(ValueError, match=r"8 of 32 samples \(25.0%\) are unusable"):
        one_epoch(backend, tmp_path, max_skip_fraction=0.01)
    with caplog.at_level(logging.WARNING):
        loader, _, _ = one_epoch(backend, tmp_path, max_skip_fraction=0.3)
    assert loader.stats == {"skipped_samples": 8, "bad_shards": 1}
    assert "shard-000002.tar: shard or its index shard-000002.idx is missing" in _warnings(caplog)


def _cut_index(idx, keep: int) -> None:
    lines = idx.read_text().splitlines()
    idx.write_text(f"v1.2 {keep}\n" + "".join(line + "\n" for line in lines[1 : 1 + keep]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_cut_short_is_a_bad_shard(tmp_path, backend):
    small_dataset(tmp_path, {}, n=32)
    _cut_index(tmp_path / "shard-000001.idx", 5)  # consistent header, 3 samples unindexed
    with pytest.raises(ValueError, match=r"shard-000001.tar: member '000013.jpg' follows the last"):
        one_epoch(backend, tmp_path, "stop")
    loader, _, _ = one_epoch(backend, tmp_path, max_skip_fraction=0.3)
    assert loader.stats == {"skipped_samples": 8, "bad_shards": 1}
    idx = tmp_path / "shard-000001.idx"
    idx.write_bytes(idx.read_bytes()[:40])  # cut mid-line: unreadable, named, still a bad shard
    with pytest.raises(ValueError, match=r"shard-000001.tar: unreadable index: .*shard-000001.idx"):
        one_epoch(backend, tmp_path, "stop")
    assert one_epoch(backend, tmp_path, max_skip_fraction=0.3)[0].stats["bad_shards"] == 1


def _eight_class_dataset(path) -> None:
    samples = [good_sample(i, label=i % 8) for i in range(32)]
    write_dataset(path, samples, 8, num_classes=8)
    (path / "labels.json").write_text(json.dumps({f"id{c}": c for c in range(8)}))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["num_classes"] = 4  # a hand edit (with classifier.num_classes=4)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edited_num_classes_is_an_error_not_half_the_data_skipped(tmp_path, backend):
    _eight_class_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"num_classes=4 but labels.json maps .* up to 7"):
        one_epoch(backend, tmp_path)
    (tmp_path / "labels.json").unlink()  # without the label map it is found while reading
    with pytest.raises(ValueError, match=r"shard-00000\d.tar.*outside \[0, 4\).*max_skip_fraction"):
        one_epoch(backend, tmp_path, max_skip_fraction=0.01)


def _zero_header(tar, key: str, ext: str = "jpg") -> None:
    entry = next(e for e in read_index(tar.with_suffix(".idx")) if e.key == key)
    offset = entry.components[ext][0] - tarfile.BLOCKSIZE
    data = bytearray(tar.read_bytes())
    data[offset : offset + tarfile.BLOCKSIZE] = bytes(tarfile.BLOCKSIZE)
    tar.write_bytes(bytes(data))


def test_zeroed_header_webdataset_counts_the_shortfall(tmp_path, caplog):
    small_dataset(tmp_path, {}, n=16, shard_size=16)
    _zero_header(tmp_path / "shard-000000.tar", "000004")  # not one of the spot-checked entries
    short = r"shard-000000.tar: read 4 of the 16 samples expected"
    with pytest.raises(ValueError, match=short + r".*on_bad_sample=stop"):
        one_epoch("webdataset", tmp_path, "stop")
    with pytest.raises(ValueError, match=short + r".*max_skip_fraction=0.01"):
        one_epoch("webdataset", tmp_path, max_skip_fraction=0.01)
    with caplog.at_level(logging.WARNING):
        loader, labels, batches = one_epoch("webdataset", tmp_path, max_skip_fraction=1.0)
    assert loader.stats == {"skipped_samples": 12, "bad_shards": 1}  # once per epoch
    assert len(batches) == 4 and sorted(set(labels.tolist())) == [0, 1, 2, 3]
    assert "read 4 of the 16 samples expected" in _warnings(caplog)


def test_zeroed_header_dali_reads_by_index_and_loses_nothing(tmp_path):
    small_dataset(tmp_path, {}, n=16, shard_size=16)
    _zero_header(tmp_path / "shard-000000.tar", "000004")
    loader, labels, _ = one_epoch("dali", tmp_path, max_skip_fraction=0.0)
    assert sorted(labels.tolist()) == sorted(i % 4 for i in range(16))
    assert loader.stats == {"skipped_samples": 0, "bad_shards": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_zeroed_spot_checked_header_found_before_reading(tmp_path, backend):
    small_dataset(tmp_path, {}, n=16, shard_size=8)
    _zero_header(tmp_path / "shard-000001.tar", "000015", "cls")  # the last entry
    with pytest.raises(ValueError, match=r"shard-000001.tar: index says 000015.cls at byte \d+, "):
        one_epoch(backend, tmp_path, "stop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_index_files_name_the_bad_pair(tmp_path, backend):
    small_dataset(tmp_path, {}, n=32)
    a, b = tmp_path / "shard-000000.idx", tmp_path / "shard-000001.idx"
    shutil.copy(a, tmp_path / "tmp.idx")
    shutil.copy(b, a)
    shutil.copy(tmp_path / "tmp.idx", b)
    with pytest.raises(ValueError, match=r"shard-000000.tar: index says 000008.jpg at byte 512"):
        one_epoch(backend, tmp_path, "stop")
    with pytest.raises(ValueError, match=r"16 of 32 .*shard-000000.tar.*; .*shard-000001.tar"):
        one_epoch(backend, tmp_path, max_skip_fraction=0.01)


# ---------------------------------------------------------------- one rank sees the bad shard


def _epoch_on_ranks(rank, world_size, path, on_bad):
    """Both ranks all-reduce per batch; the error must come on both, not a hang."""
    group = dist.group.WORLD
    cfg = bad_data_config("webdataset", path, on_bad, max_skip_fraction=0.01)
    loader = build_loader(cfg, context_from_group(group, torch.device("cpu")))
    steps = 0
    try:
        for _ in loader:
            dist.all_reduce(torch.ones(1), group=group)
            steps += 1
    except ValueError as exc:
        return steps, str(exc)
    return steps, ""


def _one_bad_shard(path) -> None:
    small_dataset(path, {}, n=32, shard_size=8)
    _zero_header(path / "shard-000000.tar", "000001")  # rank reading shard 0 gets 1 of 8


@pytest.mark.multiproc
@pytest.mark.parametrize("on_bad", ["skip", "stop"])
def test_bad_shard_on_one_rank_stops_both_at_epoch_end(tmp_path, on_bad):
    _one_bad_shard(tmp_path)
    results = run_ranks(2, _epoch_on_ranks, str(tmp_path), on_bad, timeout_s=240)
    assert results[0][0] == results[1][0] == 4  # both handed out the whole epoch
    messages = [r[1] for r in results]
    own = [m for m in messages if "shard-000000.tar: read 1 of the 8 samples" in m]
    other = [m for m in messages if "on 1 other rank(s)" in m]
    assert len(own) == 1 and len(other) == 1, messages


def _train_on_ranks(rank, world_size, out, path):
    from dist_cosface.engine import train
    from tests.tiny import tiny_config

    cfg = tiny_config(
        out,
        "data.backend=webdataset",
        f"data.path={path}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "classifier.num_classes=4",
        "train.total_steps=6",
    )
    try:
        train(cfg, context_from_group(dist.group.WORLD, torch.device("cpu")))
    except ValueError as exc:
        return str(exc)
    return ""


@pytest.mark.multiproc
def test_training_stops_on_every_rank_at_the_same_step(tmp_path):
    """The loop's per-step vote: both ranks raise, before the epoch's end (step 4)."""
    _one_bad_shard(tmp_path / "data")
    results = run_ranks(2, _train_on_ranks, str(tmp_path / "run"), str(tmp_path / "data"))
    assert sum("shard-000000.tar: read 1 of the 8 samples" in m for m in results) == 1, results
    assert sum("on 1 other rank(s)" in m for m in results) == 1, results
    assert not any("epoch 0:" in m for m in results)  # decided by the vote, not at epoch end


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_max_skip_fraction_is_validated(value):
    with pytest.raises(ValueError, match=r"max_skip_fraction must be in \[0, 1\]"):
        DataConfig(max_skip_fraction=value)


def _png_with_broken_data(seed: int) -> bytes:
    """A PNG whose header and chunk chain are sound but whose image data fails its checksum:
    past the DALI loader's header check, refused by DALI's decoder (and by Pillow)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    data = bytearray(out.getvalue())
    data[data.find(b"IDAT") + 40] ^= 0xFF
    return bytes(data)


def test_dali_decoder_failure_is_found_and_skipped(tmp_path, caplog):
    small_dataset(tmp_path, {13: {"png": _png_with_broken_data(13), "cls": b"1"}}, n=48)
    # batches of 16: DALI parses them on its pool threads, where a parse failure could crash
    cfg = loader_config("dali", tmp_path, batch_size=16, image_size=16, max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        loader = build_loader(cfg, DistContext())
        batches = list(loader)
    assert len(batches) == 3 and loader.stats["skipped_samples"] == 1
    named = r"shard-000001.tar:\d+:000013.png: corrupt image \(DALI could not decode it\)"
    assert re.search(named, _warnings(caplog))
    with pytest.raises(ValueError, match=named + r" \(data.on_bad_sample=stop\)"):
        list(build_loader(replace(cfg, on_bad_sample="stop"), DistContext()))
