"""Embed every training sample once, each rank its contiguous run of shards.

Two readers, both in shard order with no shuffling or augmentation, and both check that each
sample is the one the index lists at that position (its global index is its identity):

* ``webdataset``: the webdataset library's tar reader in DataLoader workers (worker ``w``
  reads every W-th shard of the rank), images decoded as the training loader decodes them
  (``imageio.decode_resized``); an undecodable image or a bad label is recorded as an
  unreadable sample (dropped from the new set and listed in the report), not an error;
* ``dali``: DALI's webdataset reader with the index files, decoding on the GPU (``mixed``)
  when the rank has one; DALI cannot skip a bad image, so one stops the command.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dist_cosface.clean.config import CleanConfig
from dist_cosface.clean.source import SourceSet, rank_shards
from dist_cosface.eval.embedding import input_dtype
from dist_cosface.imageio import (
    DALI_EXTENSIONS,
    PIXEL_SCALE,
    decode_resized,
    image_key,
    to_unit_range,
)


@dataclass
class Embedded:
    """This rank's samples: global indices, labels, unit embeddings, unreadable samples."""

    indices: torch.Tensor  # [n] int64
    labels: torch.Tensor  # [n] int64
    embeddings: torch.Tensor  # [n, D] float32, unit rows
    unreadable: list[tuple[int, str]]  # (global index, problem), not in the tensors


def parse_label(raw: bytes | None, num_classes: int) -> tuple[int, str]:
    if raw is None:
        return -1, "sample without .cls"
    try:
        label = int(bytes(raw).decode().strip())
    except (ValueError, UnicodeDecodeError):
        return -1, f"unreadable label {bytes(raw)[:20]!r}"
    if not 0 <= label < num_classes:
        return -1, f"label {label} outside [0, {num_classes})"
    return label, ""


class _ShardReader(torch.utils.data.IterableDataset):
    """uint8 batches of a list of shards, in order, with labels, global indices and problems."""

    def __init__(self, source: SourceSet, shards: list[int], batch_size: int, image_size: int):
        super().__init__()
        self.source, self.shards = source, shards
        self.batch_size, self.image_size = batch_size, image_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch: list[tuple[torch.Tensor, int, int, str]] = []
        for shard in self.shards[worker::workers]:
            for item in self._shard_items(shard):
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield _collate(batch)
                    batch = []
        if batch:
            yield _collate(batch)

    def _shard_items(self, shard: int) -> Iterator[tuple[torch.Tensor, int, int, str]]:
        from webdataset import tariterators
        from webdataset.handlers import reraise_exception

        tar, size = self.source.tars[shard], self.image_size
        entries = self.source.index(shard)
        num_classes, first = self.source.num_classes, self.source.firsts[shard]
        blank = torch.zeros(3, size, size, dtype=torch.uint8)
        position = 0
        with open(tar, "rb") as stream:
            files = tariterators.tar_file_expander(
                [{"url": str(tar), "stream": stream}], reraise_exception
            )
            for sample in tariterators.group_by_keys(files, handler=reraise_exception):
                if position >= len(entries) or sample["__key__"] != entries[position].key:
                    want = entries[position].key if position < len(entries) else "nothing"
                    raise ValueError(
                        f"{tar}: sample {position} is {sample['__key__']!r}, its index lists "
                        f"{want!r} (a stale index: convert the set again)"
                    )
                label, problem = parse_label(sample.get("cls"), num_classes)
                image = blank
                ext = image_key(sample)
                if not problem and ext is None:
                    problem = "sample without an image"
                if not problem:
                    try:
                        image = decode_resized(sample[ext], size, f"{tar} key {sample['__key__']}")
                    except ValueError as exc:
                        label, problem = -1, str(exc)
                yield image, label, first + position, problem
                position += 1
        if position != len(entries):
            raise ValueError(f"{tar}: read {position} samples, its index lists {len(entries)}")


def _collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    indices = torch.tensor([b[2] for b in batch], dtype=torch.int64)
    problems = [(b[2], b[3]) for b in batch if b[3]]
    return images, labels, indices, problems


def _webdataset_batches(source, shards, cfg: CleanConfig, image_size: int, device):
    reader = _ShardReader(source, shards, cfg.batch_size, image_size)
    workers = min(cfg.num_workers, len(shards))
    loader = torch.utils.data.DataLoader(
        reader,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        multiprocessing_context="fork" if workers else None,
    )
    for images, labels, indices, problems in loader:
        yield to_unit_range(images).to(device), labels, indices, problems


def _dali_batches(source, shards, cfg: CleanConfig, image_size: int, device):
    """DALI's reader over this rank's shards, in order (no shuffle, no mirror)."""
    if not shards:
        return
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    tars = [str(source.tars[s]) for s in shards]

    @pipeline_def(
        batch_size=cfg.batch_size,
        num_threads=max(1, cfg.num_workers),
        device_id=(device.index or 0) if gpu else None,
        seed=0,
    )
    def pipeline():
        encoded, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=[t[: -len(".tar")] + ".idx" for t in tars],
            ext=[DALI_EXTENSIONS, "cls"],
            case_sensitive_extensions=False,
            random_shuffle=False,
            pad_last_batch=True,
            missing_component_behavior="error",
            name="reader",
        )
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[PIXEL_SCALE] * 3,
            std=[PIXEL_SCALE] * 3,
        )
        return images, cls

    pipe = pipeline()
    pipe.build()
    first = source.firsts[shards[0]]
    total = source.firsts[shards[-1] + 1] - first
    expected = _expected_keys(source, shards)
    try:
        for step in range(math.ceil(total / cfg.batch_size)):
            try:
                images, cls = pipe.run()
            except RuntimeError as exc:
                raise ValueError(
                    f"DALI failed reading or decoding shards {tars[0]} .. {tars[-1]} (batch "
                    f"{step}): {exc}; --backend webdataset skips undecodable images"
                ) from exc
            yield _dali_batch(
                images, cls, step, cfg.batch_size, total, first, expected, source, device
            )
    finally:
        del pipe


def _expected_keys(source: SourceSet, shards: list[int]) -> list[tuple[str, str]]:
    return [(str(source.tars[s]), e.key) for s in shards for e in source.index(s)]


def _dali_batch(images, cls, step, batch_size, total, first, expected, source, device):
    import numpy as np

    count = min(batch_size, total - step * batch_size)  # the rest is DALI's padding
    labels, problems = [], []
    for i in range(count):
        position = step * batch_size + i
        tar, key = expected[position]
        where = cls[i].source_info()  # "<tar>:<offset>:<key>.cls"
        if not where.startswith(tar + ":") or not where.endswith(f":{key}.cls"):
            raise ValueError(f"{tar}: DALI read {where!r} where the index lists key {key!r}")
        label, problem = parse_label(np.asarray(cls[i]).tobytes(), source.num_classes)
        labels.append(label)
        if problem:
            problems.append((first + position, problem))
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    else:
        out = torch.from_numpy(np.array(images.as_tensor()))
    indices = torch.arange(first + step * batch_size, first + step * batch_size + count)
    return out[:count], torch.tensor(labels, dtype=torch.int64), indices, problems


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "webdataset"
    return "dali"


@torch.no_grad()
def embed_samples(
    backbone: nn.Module,
    source: SourceSet,
    cfg: CleanConfig,
    image_size: int,
    device: torch.device,
    rank: int,
    world_size: int,
) -> Embedded:
    """Embeddings of this rank's shards (see module doc), unit rows in float32 on the CPU."""
    first, stop = rank_shards(source.counts, world_size, rank)
    shards = list(range(first, stop))
    batches = _dali_batches if resolve_backend(cfg.backend) == "dali" else _webdataset_batches
    backbone.eval()
    dtype = input_dtype(backbone)
    out_idx, out_lab, out_emb, unreadable = [], [], [], []
    for images, labels, indices, problems in batches(source, shards, cfg, image_size, device):
        x = images.to(device, dtype)
        emb = backbone(x).float()
        if cfg.flip:
            emb = emb + backbone(torch.flip(x, dims=[3])).float()
        good = labels >= 0
        out_idx.append(indices[good])
        out_lab.append(labels[good])
        out_emb.append(F.normalize(emb[good.to(emb.device)], dim=1).cpu())
        unreadable.extend(problems)
    dim = _embedding_dim(backbone, image_size, device, dtype) if not out_emb else None
    return Embedded(
        torch.cat(out_idx) if out_idx else torch.zeros(0, dtype=torch.int64),
        torch.cat(out_lab) if out_lab else torch.zeros(0, dtype=torch.int64),
        torch.cat(out_emb) if out_emb else torch.zeros(0, dim),
        unreadable,
    )


def _embedding_dim(backbone: nn.Module, image_size: int, device, dtype) -> int:
    """The backbone's output width (a rank without shards still needs it for collectives)."""
    probe = torch.zeros(2, 3, image_size, image_size, device=device, dtype=dtype)
    return int(backbone(probe).shape[1])
