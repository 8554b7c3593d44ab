"""Loaders: round trips from real faces, rank parts, epochs, exact resume, dtypes."""

from __future__ import annotations

import pytest
import torch

from dist_cosface.data import DataConfig, build_loader
from dist_cosface.data.convert import ConvertOptions, convert
from dist_cosface.distributed import DistContext, context_from_group
from tests.data_common import (
    BACKENDS,
    ORL,
    YALEB,
    assert_faces_match,
    loader_config,
    need,
    reference_faces,
    unique_label_dataset,
)
from tests.multiproc import run_ranks


def _collect(loader):
    images, labels = zip(*list(loader))
    return torch.cat(images), torch.cat(labels)


@pytest.fixture(scope="module")
def orl_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("orl")
    convert(need(ORL), out, ConvertOptions(shard_size=100))
    return out


@pytest.fixture(scope="module")
def yaleb_subset(tmp_path_factory):
    src = tmp_path_factory.mktemp("yaleb_src")
    for ident in sorted(need(YALEB).iterdir())[:4]:
        (src / ident.name).mkdir()
        for p in sorted(ident.glob("*.jpg"))[:12]:
            (src / ident.name / p.name).symlink_to(p.resolve())
    out = tmp_path_factory.mktemp("yaleb")
    convert(src, out, ConvertOptions(shard_size=12))
    return src, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_orl_pgm_roundtrip(orl_shards, backend):
    """Every ORL face (PGM) comes back once per epoch with its label and its pixels."""
    loader = build_loader(
        loader_config(backend, orl_shards, batch_size=40, num_workers=2), DistContext()
    )
    assert (len(loader), loader.num_classes) == (10, 40)
    images, labels = _collect(loader)
    assert images.shape == (400, 3, 32, 32) and labels.dtype == torch.int64
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    assert torch.equal(torch.bincount(labels), torch.full((40,), 10))
    refs, ref_labels = reference_faces(ORL, 32)
    # webdataset decodes exactly like the reference (PIL); DALI's resize differs slightly
    assert_faces_match(images, labels, refs, ref_labels, 1e-6 if backend == "webdataset" else 0.06)
    assert len({tuple(r) for r in images.flatten(1).tolist()}) == 400


@pytest.mark.parametrize("backend", BACKENDS)
def test_yaleb_jpeg_roundtrip(yaleb_subset, backend):
    src, shards = yaleb_subset
    loader = build_loader(loader_config(backend, shards, batch_size=12), DistContext())
    images, labels = _collect(loader)
    assert images.shape == (48, 3, 32, 32) and torch.equal(
        torch.bincount(labels), torch.full((4,), 12)
    )
    refs, ref_labels = reference_faces(src, 32)
    assert_faces_match(images, labels, refs, ref_labels, 1e-6 if backend == "webdataset" else 0.06)


def _rank_labels(rank, world_size, backend, path):
    ctx = context_from_group(torch.distributed.group.WORLD, torch.device("cpu"))
    loader = build_loader(loader_config(backend, path, batch_size=4, image_size=16), ctx)
    per_epoch = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        per_epoch.append([x for batch in loader for x in batch[1].tolist()])
    return len(loader), per_epoch


@pytest.mark.multiproc
@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_parts_disjoint_and_complete(tmp_path, backend):
    unique_label_dataset(tmp_path, 48, 12)
    (len0, epochs0), (len1, epochs1) = run_ranks(2, _rank_labels, backend, str(tmp_path))
    assert len0 == len1 == 6
    for part0, part1 in zip(epochs0, epochs1):
        assert len(set(part0)) == len(set(part1)) == 24 and not set(part0) & set(part1)
        assert set(part0) | set(part1) == set(range(48))
    assert set(epochs0[0]) != set(epochs0[1]), "rank parts should rotate between epochs"


@pytest.mark.parametrize("backend", BACKENDS + ["synthetic"])
def test_equal_length_on_uneven_ranks(tmp_path, backend):
    """Shards of 10, 10, 7, 3 samples over 3 ranks: every rank yields the same count."""
    unique_label_dataset(tmp_path, 30, 10)
    (tmp_path / "extra").mkdir()
    lengths = set()
    for rank in range(3):
        ctx = DistContext(rank=rank, world_size=3)
        loader = build_loader(loader_config(backend, tmp_path, batch_size=3, image_size=16), ctx)
        lengths.add((len(loader), sum(1 for _ in loader)))
    assert len(lengths) == 1 and lengths.pop()[0] >= 1


@pytest.mark.parametrize("backend", BACKENDS + ["synthetic"])
def test_epochs_deterministic_and_exact_resume(tmp_path, backend):
    unique_label_dataset(tmp_path, 40, 10)
    cfg = loader_config(
        backend, tmp_path, batch_size=4, image_size=16, num_workers=2, random_flip=True
    )

    def run(epoch):
        loader = build_loader(cfg, DistContext())
        loader.set_epoch(epoch)
        return list(loader)

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other))

    loader = build_loader(cfg, DistContext())
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_consumed": 3}
    resumed = build_loader(cfg, DistContext())
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a training loop does after restoring
    rest = list(resumed)
    assert len(rest) == len(first) - 3
    for (x, y), (rx, ry) in zip(first[3:], rest):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == {"epoch": 1, "batches_consumed": len(first)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype(tmp_path, backend, dtype):
    unique_label_dataset(tmp_path, 8, 8)
    x, y = next(
        iter(
            build_loader(
                loader_config(backend, tmp_path, image_size=16, output_dtype=dtype), DistContext()
            )
        )
    )
    assert x.dtype == getattr(torch, dtype) and x.shape == (8, 3, 16, 16) and y.dtype == torch.int64


def test_synthetic_is_learnable_and_rank_specific():
    cfg = DataConfig(
        batch_size=32,
        image_size=32,
        synthetic_num_classes=8,
        synthetic_samples_per_class=16,
        random_flip=False,
    )
    images, labels = _collect(build_loader(cfg, DistContext()))
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    # nearest class mean (means from even samples) classifies the odd samples
    flat = images.flatten(1)
    train, test = torch.arange(0, len(flat), 2), torch.arange(1, len(flat), 2)
    means = torch.stack([flat[train][labels[train] == c].mean(0) for c in range(8)])
    pred = torch.cdist(flat[test], means).argmin(1)
    assert float((pred == labels[test]).float().mean()) > 0.9
    other = _collect(build_loader(cfg, DistContext(rank=1, world_size=2)))[1]
    mine = _collect(build_loader(cfg, DistContext(rank=0, world_size=2)))[1]
    assert len(mine) == len(other) == 64 and not torch.equal(mine, other)


def test_webdataset_reads_pipe_sources(tmp_path):
    """A ``pipe:`` manifest source: shards are fetched by the same command, no index checks."""
    unique_label_dataset(tmp_path, 16, 8)
    path = f"pipe:cat {tmp_path}/manifest.json"
    loader = build_loader(
        loader_config("webdataset", path, batch_size=4, image_size=16), DistContext()
    )
    assert (len(loader), loader.num_classes) == (4, 16)
    assert sorted(_collect(loader)[1].tolist()) == list(range(16))


def test_epoch_end_state_matches_engine_use():
    """After an epoch the loader stays at it until set_epoch; a finished state resumes at e+1."""
    cfg = DataConfig(
        batch_size=16, image_size=16, synthetic_num_classes=4, synthetic_samples_per_class=8
    )
    loader = build_loader(cfg, DistContext())
    loader.set_epoch(3)
    first = _collect(loader)[1]
    assert loader.epoch == 3 and loader.state_dict() == {"epoch": 3, "batches_consumed": 2}
    restored = build_loader(cfg, DistContext())
    restored.load_state_dict(loader.state_dict())
    nxt = _collect(restored)[1]
    loader.set_epoch(4)
    assert restored.epoch == 4 and torch.equal(nxt, _collect(loader)[1])
    assert not torch.equal(first, nxt)
    with pytest.raises(ValueError, match="batches_consumed=9"):
        restored.load_state_dict({"epoch": 0, "batches_consumed": 9})


def test_unique_label_dataset_index_matches_dali_tool(tmp_path):
    """Our single-pass index equals what DALI's own wds2idx writes for the same tar."""
    wds2idx = pytest.importorskip("wds2idx")
    unique_label_dataset(tmp_path, 5, 5)
    tar = tmp_path / "shard-000000.tar"
    with wds2idx.IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "ref.idx").read_text() == tar.with_suffix(".idx").read_text()
