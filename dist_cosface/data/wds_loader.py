"""WebDataset backend: the webdataset library's tar reader + torch DataLoader workers.

For machines without DALI. Rank ``r`` reads shard group ``(r + epoch) % world_size`` (groups
are balanced by sample count); inside a rank, DataLoader worker ``w`` reads every W-th shard of
the epoch's shuffled group order. Each worker stream is endless (it starts a new shuffled pass
when its shards run out), so the DataLoader's round-robin order is fixed: global batch ``i``
is batch ``i // W`` of worker ``i % W``. Resuming at batch ``k`` lets each worker drop its
first batches *before* decoding them; bad images found while decoding are replaced inside
their batch (``repair_batch``), so batch boundaries never depend on decoding.
"""

from __future__ import annotations

import io
import multiprocessing
import random
from collections.abc import Iterator

import torch

from dist_cosface.data.base import DTYPES, TrainLoader, repair_batch, stable_seed
from dist_cosface.data.config import DataConfig
from dist_cosface.data.dataset import IMAGE_EXT_SET, ShardSet, balanced_groups, open_shards
from dist_cosface.distributed import DistContext

_IMAGE_EXTS = IMAGE_EXT_SET.split(";")


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, size, size] (RGB, resized without keeping aspect)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


INCOMPLETE = "sample without .cls or image"


def _parse_label(sample: dict, num_classes: int) -> tuple[int | None, str]:
    """(label, problem) from a raw sample; problem is '' when the sample is usable."""
    raw = sample.get("cls")
    if raw is None or not any(ext in sample for ext in _IMAGE_EXTS):
        return None, INCOMPLETE
    try:
        label = int(bytes(raw).decode().strip())
    except ValueError:
        return None, f"unreadable label {bytes(raw)[:20]!r}"
    if not 0 <= label < num_classes:
        return None, f"label {label} outside [0, {num_classes})"
    return label, ""


class _WorkerStream(torch.utils.data.IterableDataset):
    """Endless uint8 batches of one rank for one epoch; split across DataLoader workers."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        num_classes: int,
        seed: int,
        skip: int,
        indexed: bool,
    ):
        super().__init__()
        self.cfg, self.urls, self.num_classes, self.indexed = cfg, urls, num_classes, indexed
        self.seed, self.skip = seed, skip

    def _raw_samples(self, stream: int, num_streams: int) -> Iterator[tuple[dict, int]]:
        import webdataset as wds

        stop = self.cfg.on_bad_sample == "stop"
        bad_tar = []

        def handler(exc: Exception) -> bool:
            if stop:
                raise ValueError(f"unreadable shard data: {exc}") from exc
            bad_tar.append(str(exc))
            return True

        for pass_no in range(1 << 62):
            rng = random.Random(stable_seed(self.seed, stream, pass_no))
            order = self.urls[:]
            rng.shuffle(order)
            mine = [{"url": u} for u in order[stream::num_streams]]
            buffer: list[tuple[dict, int]] = []
            good = 0
            for sample in wds.tarfile_samples(mine, handler=handler):
                label, problem = _parse_label(sample, self.num_classes)
                if problem == INCOMPLETE and self.indexed:
                    continue  # local shards: already found and counted from the index files
                if problem:
                    where = f"{sample.get('__url__')} key {sample.get('__key__')}"
                    if stop:
                        raise ValueError(f"{where}: {problem}")
                    yield {"bad": problem}, -1
                    continue
                buffer.append((sample, label))
                good += 1
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            while bad_tar:  # count each unreadable tar member once per pass
                yield {"bad": bad_tar.pop()}, -1
            if good == 0:  # an endless pass over nothing would hang this rank
                raise ValueError(f"no usable samples in shards {[m['url'] for m in mine]}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader asks worker 0 first, so after resuming at batch k worker 0 must play
        # stream k % W: worker w plays stream (w + k) % W and drops the batches before k.
        stream = (worker + self.skip) % num_workers
        skip = max(0, -(-(self.skip - stream) // num_workers))
        batch, skipped, index = [], 0, 0
        for sample, label in self._raw_samples(stream, num_workers):
            if label < 0:
                skipped += 1
                continue
            batch.append((sample, label))
            if len(batch) < self.cfg.batch_size:
                continue
            if index >= skip:
                yield self._decode(batch, stream, index, skipped)
            batch, skipped, index = [], 0, index + 1

    def _decode(self, batch: list, stream: int, index: int, skipped: int):
        size = self.cfg.image_size
        images = torch.empty(len(batch), 3, size, size, dtype=torch.uint8)
        labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
        bad = torch.zeros(len(batch), dtype=torch.bool)
        for i, (sample, _) in enumerate(batch):
            ext = next(e for e in _IMAGE_EXTS if e in sample)
            try:
                images[i] = decode_image(sample[ext], size)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad images
                if self.cfg.on_bad_sample == "stop":
                    where = f"{sample['__url__']} key {sample['__key__']}"
                    raise ValueError(f"{where}: corrupt image ({exc})") from exc
                bad[i] = True
        images, labels, replaced = repair_batch(images, labels, bad, "webdataset batch")
        if self.cfg.random_flip:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, stream, index, 1))
            flip = torch.rand(len(batch), generator=gen) < 0.5
            images[flip] = images[flip].flip(-1)
        return images, labels, skipped + replaced


class WebDatasetLoader(TrainLoader):
    def __init__(self, cfg: DataConfig, ctx: DistContext, shards: ShardSet | None = None):
        shards = shards or open_shards(cfg.path, cfg.on_bad_sample)
        self.groups = balanced_groups(shards.counts, ctx.world_size)
        per_group = [sum(shards.counts[i] for i in g) for g in self.groups]
        super().__init__(min(per_group) // cfg.batch_size, shards.manifest.num_classes)
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, ctx.rank, ctx.world_size
        self.stats["skipped_samples"] = shards.skipped_samples
        self.stats["bad_shards"] = len(shards.problems)
        self.num_workers = min(cfg.num_workers, min(len(g) for g in self.groups))

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        group = self.groups[(self.rank + epoch) % self.world_size]
        urls = [self.shards.urls[i] for i in group]
        seed = stable_seed(self.cfg.seed, epoch, self.rank)
        indexed = all(self.shards.index_paths)
        stream = _WorkerStream(self.cfg, urls, self.num_classes, seed, start, indexed)
        # fork, as PyTorch does by default on Linux: workers restart every epoch, and a
        # spawned worker would re-import torch each time (inherited when ranks are spawned)
        methods = multiprocessing.get_all_start_methods()
        context = "fork" if self.num_workers and "fork" in methods else None
        loader = torch.utils.data.DataLoader(
            stream,
            multiprocessing_context=context,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers else None,
        )
        dtype = DTYPES[self.cfg.output_dtype]
        batches = iter(loader)
        try:
            for images, labels, skipped in batches:
                self.stats["skipped_samples"] += int(skipped)
                yield (images.to(torch.float32) / 127.5 - 1.0).to(dtype), labels
        finally:
            # stop the endless workers now: left to a later garbage collection (an exception's
            # traceback keeps them referenced) their shutdown stalls whatever runs then
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
