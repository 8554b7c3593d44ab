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

import multiprocessing
import random
from collections.abc import Iterator

import torch

from dist_cosface.data import augment
from dist_cosface.data.base import DTYPES, BaseLoader, repair_batch
from dist_cosface.data.config import DataConfig
from dist_cosface.data.dataset import ShardSet, balanced_groups, open_shards
from dist_cosface.data.locations import open_stream
from dist_cosface.distributed import DistContext
from dist_cosface.imageio import decode_resized, image_key, to_unit_range
from dist_cosface.seeding import stable_seed

INCOMPLETE = "sample without .cls or image"


def _parse_label(sample: dict, num_classes: int) -> tuple[int | None, str]:
    """(label, problem) from a raw sample; problem is '' when the sample is usable."""
    raw = sample.get("cls")
    if raw is None or image_key(sample) is None:
        return None, INCOMPLETE
    try:
        label = int(bytes(raw).decode().strip())
    except ValueError:
        return None, f"unreadable label {bytes(raw)[:20]!r}"
    if not 0 <= label < num_classes:
        return None, f"label {label} outside [0, {num_classes})"
    return label, ""


class _WorkerStream(torch.utils.data.IterableDataset):
    """Endless uint8 batches of one rank for one epoch; split across DataLoader workers.

    Never raises for bad data: each loss travels with its batch as an event
    ``(where, problem, lost samples, bad shard or '')`` and the loader's :class:`BadDataLog`
    decides (all ranks alike) whether the run stops.
    """

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        num_classes: int,
        seed: int,
        skip: int,
        expected: dict[str, int],
        indexed: bool,
    ):
        super().__init__()
        self.cfg, self.urls, self.num_classes, self.expected = cfg, urls, num_classes, expected
        self.seed, self.skip, self.indexed = seed, skip, indexed

    def _shard_samples(self, url: str, errors: list[str]) -> Iterator[dict]:
        """The samples of one tar; read errors end the shard and are put in ``errors``."""
        from webdataset import tariterators

        def handler(exc: Exception) -> bool:
            errors.append(str(exc.args[0]) if exc.args else repr(exc))
            return True

        try:
            stream = open_stream(url)
        except (OSError, ValueError) as exc:
            errors.append(str(exc))
            return
        try:
            files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler)
            yield from tariterators.group_by_keys(files, handler=handler)
        finally:
            try:
                stream.close()
            except OSError as exc:
                errors.append(str(exc))

    def _raw_samples(self, stream: int, num_streams: int) -> Iterator[tuple[dict, int]]:
        indexed = self.indexed
        for pass_no in range(1 << 62):
            rng = random.Random(stable_seed(self.seed, stream, pass_no))
            order = self.urls[:]
            rng.shuffle(order)
            buffer: list[tuple[dict, int]] = []
            good = 0
            for url in order[stream::num_streams]:
                read, errors = 0, []
                for sample in self._shard_samples(url, errors):
                    label, problem = _parse_label(sample, self.num_classes)
                    if problem == INCOMPLETE and indexed:
                        continue  # local shards: already found and counted from the index files
                    read += 1
                    if problem:
                        yield (f"{url} key {sample.get('__key__')}", problem, 1, ""), -1
                        continue
                    buffer.append((sample, label))
                    good += 1
                    if len(buffer) >= self.cfg.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
                event = _shard_event(url, read, self.expected[url], errors)
                if event is not None:
                    yield event, -1
            rng.shuffle(buffer)
            yield from buffer
            if good == 0:  # an endless pass over nothing would hang this rank
                raise ValueError(f"no usable samples in shards {order[stream::num_streams]}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader asks worker 0 first, so after resuming at batch k worker 0 must play
        # stream k % W: worker w plays stream (w + k) % W and drops the batches before k.
        stream = (worker + self.skip) % num_workers
        skip = max(0, -(-(self.skip - stream) // num_workers))
        batch, events, index = [], [], 0
        for sample, label in self._raw_samples(stream, num_workers):
            if label < 0:
                events.append(sample)
                continue
            batch.append((sample, label))
            if len(batch) < self.cfg.batch_size:
                continue
            if index >= skip:  # augmented by the batch's number in the rank's epoch
                params = augment.batch_params(
                    self.cfg, self.seed, index * num_workers + stream, len(batch)
                )
                yield self._decode(batch, stream, index, events, params)
            batch, events, index = [], [], index + 1

    def _decode(
        self,
        batch: list,
        stream: int,
        index: int,
        events: list,
        params: augment.AugmentParams | None,
    ):
        size = self.cfg.image_size
        images = torch.empty(len(batch), 3, size, size, dtype=torch.uint8)
        labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
        bad = torch.zeros(len(batch), dtype=torch.bool)
        for i, (sample, _) in enumerate(batch):
            data = sample[image_key(sample)]
            try:
                if params is not None and (params.cropped[i] or params.lowered[i]):
                    images[i] = augment.decode_sample(data, size, params, i)
                else:
                    images[i] = decode_resized(data, size)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad images
                where = f"{sample['__url__']} key {sample['__key__']}"
                events.append((where, f"corrupt image ({exc})", 1, ""))
                bad[i] = True
        if params is not None:  # before the repair: a copy carries its source's steps (as DALI)
            augment.apply(images, params)
        images, labels, _ = repair_batch(images, labels, bad, "webdataset batch")
        if self.cfg.random_flip:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, stream, index, 1))
            flip = torch.rand(len(batch), generator=gen) < 0.5
            images[flip] = images[flip].flip(-1)
        return images, labels, events


def _shard_event(url: str, read: int, expected: int, errors: list[str]):
    """The event for a shard that gave other than its expected samples (or failed to read).

    ``expected``: local shards, the complete samples of its index (incomplete ones were
    counted before reading and are not in ``read``); remote shards, the manifest's count.
    """
    if read == expected and not errors:
        return None
    problem = f"read {read} of the {expected} samples expected"
    if errors:
        problem += f" ({'; '.join(errors[:3])})"
    return (url, problem, max(0, expected - read), url)


class WebDatasetLoader(BaseLoader):
    def __init__(self, cfg: DataConfig, ctx: DistContext, shards: ShardSet | None = None):
        shards = shards or open_shards(cfg.path, cfg.on_bad_sample, cfg.max_skip_fraction)
        self.groups = balanced_groups(shards.counts, ctx.world_size)
        per_group = [sum(shards.counts[i] for i in g) for g in self.groups]
        super().__init__(min(per_group) // cfg.batch_size, shards.manifest.num_classes)
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, ctx.rank, ctx.world_size
        self.track_bad_data(cfg, ctx, shards)
        self.num_workers = min(cfg.num_workers, min(len(g) for g in self.groups))

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        group = self.groups[(self.rank + epoch) % self.world_size]
        urls = [self.shards.urls[i] for i in group]
        seed = stable_seed(self.cfg.seed, epoch, self.rank)
        # what each shard must give: its complete indexed samples (local) or manifest count
        expected = {self.shards.urls[i]: self.shards.counts[i] for i in group}
        indexed = all(self.shards.index_paths)
        stream = _WorkerStream(self.cfg, urls, self.num_classes, seed, start, expected, indexed)
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
            for images, labels, events in batches:
                for where, problem, lost, shard in events:
                    self.bad.record(where, problem, int(lost), shard)
                yield to_unit_range(images).to(dtype), labels
        finally:
            # stop the endless workers now: left to a later garbage collection (an exception's
            # traceback keeps them referenced) their shutdown stalls whatever runs then
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
