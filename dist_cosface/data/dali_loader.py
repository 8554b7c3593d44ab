"""DALI backend: ``fn.readers.webdataset`` with the shards' index files, decoded on the GPU
(``mixed``: nvJPEG, hardware JPEG decoder where present) or on the CPU.

The reader splits the concatenated samples into ``world_size`` contiguous parts and rank ``r``
reads part ``(r + epoch) % world_size`` (the shards were shuffled globally when written, so each
part is a random subset, and the rotation gives each rank different data each epoch). The
reader is rebuilt per epoch with a seed from ``(seed, epoch, rank)``, which makes the epoch's
order reproducible; resuming at batch ``k`` runs the reader (not the decoder) ``k`` times.

Reading and decoding are two pipelines joined here, batch by batch, so that a bad sample never
reaches the decoder: DALI's decoder cannot skip one (it fails the whole batch) and DALI 2.4
crashes the process with SIGSEGV when an image it cannot parse is parsed on one of the
decoder's pool threads (batches larger than 4 x (threads + 1)). Each image's header
is checked first (``data/image_headers.py``, a few microseconds an image) and each label
parsed; a bad sample is fed to the decoder as a small placeholder image and then replaced by a
copy of a good sample of its batch (``repair_batch``), as the webdataset loader does, logged
with shard and key and counted when the batch is handed out. An image that passes the check
and still fails the decoder (a DALI error) is found by decoding the batches in flight one
image at a time, remembered as bad, and the epoch goes on from the same batch.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import torch

from dist_cosface.data import augment
from dist_cosface.data.base import DTYPES, BaseLoader, repair_batch
from dist_cosface.data.config import DataConfig
from dist_cosface.data.dataset import ShardSet, open_shards
from dist_cosface.data.image_headers import header_problem
from dist_cosface.distributed import DistContext
from dist_cosface.imageio import DALI_EXTENSIONS, PIXEL_SCALE
from dist_cosface.seeding import stable_seed


def dali_device(cfg: DataConfig, ctx: DistContext) -> str:
    device = cfg.dali_device
    if device == "auto":
        device = "mixed" if ctx.device.type == "cuda" else "cpu"
    if device == "mixed" and ctx.device.type != "cuda":
        raise ValueError(f"data.dali_device='mixed' needs a CUDA device, the rank has {ctx.device}")
    return device


@cache
def _placeholder():
    """A valid 8x8 grey JPEG fed to the decoder in place of a bad image (then replaced)."""
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(out, "JPEG")
    return np.frombuffer(out.getvalue(), dtype=np.uint8)


@dataclass
class _Checked:
    """What the decoder does not see of one batch: labels, the bad samples and their faults."""

    labels: torch.Tensor  # int64 [B]
    bad: torch.Tensor  # bool [B]
    problems: list[tuple[str, str]]  # (shard.tar:offset:key.ext, what is wrong)


class _DecodeFailed(Exception):
    """The decoder pipeline raised at batch ``index`` of the epoch (``in_flight`` fed)."""

    def __init__(self, index: int, in_flight: int, error: RuntimeError):
        super().__init__(str(error))
        self.index, self.in_flight, self.error = index, in_flight, error


class DaliLoader(BaseLoader):
    def __init__(self, cfg: DataConfig, ctx: DistContext, shards: ShardSet | None = None):
        # the index files are checked against their tars here: a stale or swapped .idx is
        # named before DALI, which reads by the index's offsets, ever sees it
        shards = shards or open_shards(cfg.path, cfg.on_bad_sample, cfg.max_skip_fraction)
        if shards.index_paths and not all(shards.index_paths):
            raise ValueError(f"data.path={cfg.path!r}: the dali backend reads local shards only")
        per_rank = shards.num_samples // ctx.world_size
        super().__init__(per_rank // cfg.batch_size, shards.manifest.num_classes)
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, ctx.rank, ctx.world_size
        self.decode_device = dali_device(cfg, ctx)
        self.out_device = ctx.device if self.decode_device == "mixed" else torch.device("cpu")
        if self.decode_device == "mixed" and self.out_device.index is None:
            self.out_device = torch.device("cuda", torch.cuda.current_device())
        self.rejected: set[str] = set()  # shard:offset:key of images DALI failed to decode
        self.track_bad_data(cfg, ctx, shards)

    def _reader(self, epoch: int):
        """The epoch's reader pipeline: encoded images and labels, in the epoch's order."""
        from nvidia.dali import fn, pipeline_def

        cfg = self.cfg

        @pipeline_def(
            batch_size=cfg.batch_size,
            num_threads=1,  # the reader reads on its own thread; no other operator here
            device_id=None,
            seed=stable_seed(cfg.seed, epoch, self.rank) % (1 << 31),
            prefetch_queue_depth=cfg.dali_prefetch,
        )
        def pipeline():
            encoded, cls = fn.readers.webdataset(
                paths=self.shards.urls,
                index_paths=self.shards.index_paths,
                ext=[DALI_EXTENSIONS, "cls"],
                case_sensitive_extensions=False,
                shard_id=(self.rank + epoch) % self.world_size,
                num_shards=self.world_size,
                random_shuffle=True,
                initial_fill=cfg.shuffle_buffer,
                missing_component_behavior="skip",
                name="reader",
            )
            return encoded, cls

        pipe = pipeline()
        pipe.build()
        return pipe

    def _decoder(self, batch_size: int, prefetch: int):
        """Decode, resize (and augment), flip and normalize batches fed as ``encoded``,
        ``mirror`` and the augmentation's parameters (``_feed_params``)."""
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.cfg
        gpu = self.decode_device == "mixed"

        @pipeline_def(
            batch_size=batch_size,
            num_threads=max(1, cfg.num_workers),
            device_id=self.out_device.index if gpu else None,
            prefetch_queue_depth=prefetch,
            enable_conditionals=cfg.augment.active,  # per-sample steps (augment.dali_ops)
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # hw_decoder_load: share of JPEGs sent to the A100/H100-class hardware decoder
            extra = {"hw_decoder_load": 0.65} if gpu else {}
            images = fn.decoders.image(
                encoded, device=self.decode_device, output_type=types.RGB, **extra
            )
            images = augment.dali_ops(images, cfg.augment, cfg.image_size)
            # flips come from Python, seeded per batch: exact on resume without replaying them
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            return fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT16 if cfg.output_dtype == "float16" else types.FLOAT,
                output_layout="CHW",
                mean=[PIXEL_SCALE] * 3,
                std=[PIXEL_SCALE] * 3,
                mirror=mirror,
            )

        pipe = pipeline()
        pipe.build()
        return pipe

    def _check(self, encoded, cls) -> tuple[list | object, _Checked]:
        """The batch to feed the decoder (bad images swapped for the placeholder) and the rest."""
        import numpy as np

        n = len(cls)
        labels, bad, problems = [-1] * n, [False] * n, []
        feed = encoded  # fed as it is unless an image is bad
        for i in range(n):
            raw = np.asarray(cls[i]).tobytes()
            try:
                labels[i] = int(raw.decode().strip())
            except (ValueError, UnicodeDecodeError):
                pass
            if not 0 <= labels[i] < self.num_classes:
                # source_info is "shard.tar:offset:key.cls": shard and key of the sample
                problem = f"label {raw[:20]!r} outside [0, {self.num_classes})"
                problems.append((cls[i].source_info(), problem))
                bad[i] = True
            image = encoded[i]
            problem = header_problem(np.asarray(image).tobytes())
            where = image.source_info() if problem or self.rejected else ""
            if not problem and where in self.rejected:
                problem = "DALI could not decode it"
            if problem:
                if feed is encoded:
                    feed = [np.asarray(encoded[k]) for k in range(n)]
                feed[i] = _placeholder()
                if not bad[i]:
                    problems.append((where, f"corrupt image ({problem})"))
                bad[i] = True
        checked = _Checked(torch.tensor(labels), torch.tensor(bad), problems)
        return feed, checked

    def _flips(self, epoch: int, index: int):
        import numpy as np

        if not self.cfg.random_flip:
            return np.zeros(self.cfg.batch_size, dtype=np.int32)
        rng = np.random.default_rng(stable_seed(self.cfg.seed, epoch, self.rank, index, 1))
        return (rng.random(self.cfg.batch_size) < 0.5).astype(np.int32)

    def _to_torch(self, images) -> torch.Tensor:
        if self.decode_device == "cpu":
            import numpy as np

            return torch.from_numpy(np.array(images.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        dtype = torch.float16 if self.cfg.output_dtype == "float16" else torch.float32
        out = torch.empty(dense.shape(), dtype=dtype, device=self.out_device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.out_device))
        return out

    def _stream(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start + 1, ...`` of the epoch; _DecodeFailed if DALI raises."""
        depth = self.cfg.dali_prefetch
        reader, decoder = self._reader(epoch), self._decoder(self.cfg.batch_size, depth)
        dtype = DTYPES[self.cfg.output_dtype]
        pending: deque[_Checked] = deque()  # fed to the decoder, not yet handed out
        try:
            for _ in range(start):  # exact resume: the same seed, so skip the read batches
                reader.run()
            for index in range(start, start + depth):  # the decoder's first run takes `depth`
                pending.append(self._feed(reader, decoder, epoch, index))
            for index in itertools.count(start):
                try:
                    (images,) = decoder.run()
                except RuntimeError as exc:
                    raise _DecodeFailed(index, len(pending), exc) from exc
                checked = pending.popleft()
                for where, problem in checked.problems:  # counted when handed out
                    self.bad.record(where, problem)
                out = self._to_torch(images).to(dtype)
                out, labels, _ = repair_batch(out, checked.labels, checked.bad, "dali batch")
                pending.append(self._feed(reader, decoder, epoch, index + depth))
                yield out, labels.to(self.out_device, non_blocking=True)
        finally:
            del reader, decoder

    def _feed(self, reader, decoder, epoch: int, index: int) -> _Checked:
        """Read batch ``index``, check it and feed it to the decoder."""
        encoded, cls = reader.run()
        batch, checked = self._check(encoded, cls)
        decoder.feed_input("encoded", batch)
        decoder.feed_input("mirror", self._flips(epoch, index))
        seed = stable_seed(self.cfg.seed, epoch, self.rank)  # the webdataset loader's too
        self._feed_params(decoder, augment.batch_params(self.cfg, seed, index, len(cls)))
        return checked

    def _feed_params(self, decoder, params: augment.AugmentParams | None) -> None:
        """Per-sample augmentation parameters drawn in Python: exact on resume, no replay."""
        for name, values in augment.dali_inputs(self.cfg.augment, params).items():
            decoder.feed_input(name, values)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            stream = self._stream(epoch, start)
            try:
                for batch in stream:
                    start += 1
                    yield batch
            except _DecodeFailed as failed:
                self._find_rejected(epoch, failed)  # then go on from the same batch
            finally:
                stream.close()

    def _find_rejected(self, epoch: int, failed: _DecodeFailed) -> None:
        """Decode the images of the batches in flight one at a time (a single-image batch is
        parsed on the calling thread, which DALI survives) and remember those DALI rejects;
        ValueError naming the shards when none is found."""
        import numpy as np

        reader, probe, found = self._reader(epoch), None, []
        try:
            for _ in range(failed.index):
                reader.run()
            for _ in range(failed.in_flight):
                encoded, _ = reader.run()
                for i in range(len(encoded)):
                    where = encoded[i].source_info()
                    if where in self.rejected:
                        continue
                    if probe is None:  # a pipeline that failed is dead: rebuilt
                        probe = self._decoder(1, 1)
                    probe.feed_input("encoded", [np.asarray(encoded[i])])
                    probe.feed_input("mirror", np.zeros(1, dtype=np.int32))
                    self._feed_params(probe, augment.AugmentParams.identity(1, self.cfg.image_size))
                    try:
                        probe.run()
                    except RuntimeError:
                        found.append(where)
                        probe = None
        finally:
            del reader, probe
        if not found:
            shards = self.shards.urls
            named = ", ".join(shards[:4]) + (" ..." if len(shards) > 4 else "")
            raise ValueError(
                f"DALI failed reading/decoding batch {failed.index} of epoch {epoch} "
                f"(one of {named}): {failed.error}"
            ) from failed.error
        self.rejected.update(found)
