"""DALI backend: ``fn.readers.webdataset`` with the shards' index files, decoded on the GPU
(``mixed``: nvJPEG, hardware JPEG decoder where present) or on the CPU.

The reader splits the concatenated samples into ``world_size`` contiguous parts and rank ``r``
reads part ``(r + epoch) % world_size`` (the shards were shuffled globally when written, so each
part is a random subset, and the rotation gives each rank different data each epoch). The
pipeline is rebuilt per epoch with a seed from ``(seed, epoch, rank)``, which makes the epoch's
order reproducible; resuming at batch ``k`` runs and drops the first ``k`` batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from dist_cosface.data.base import DTYPES, BaseLoader, repair_batch
from dist_cosface.data.config import DataConfig
from dist_cosface.data.dataset import ShardSet, open_shards
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
        self.track_bad_data(cfg, ctx, shards)

    def _build(self, epoch: int, decode: bool = True):
        """The epoch's pipeline; ``decode=False``: the same reader (same seed, same order)
        returning the encoded images, to find an image DALI could not decode."""
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.cfg
        gpu = self.decode_device == "mixed"

        @pipeline_def(
            batch_size=cfg.batch_size,
            num_threads=max(1, cfg.num_workers),
            device_id=self.out_device.index if gpu else None,
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
            if not decode:
                return encoded, cls
            # hw_decoder_load: share of JPEGs sent to the A100/H100-class hardware decoder
            extra = {"hw_decoder_load": 0.65} if gpu else {}
            images = fn.decoders.image(
                encoded, device=self.decode_device, output_type=types.RGB, **extra
            )
            images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size)
            mirror = fn.random.coin_flip(probability=0.5) if cfg.random_flip else 0
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT16 if cfg.output_dtype == "float16" else types.FLOAT,
                output_layout="CHW",
                mean=[PIXEL_SCALE] * 3,
                std=[PIXEL_SCALE] * 3,
                mirror=mirror,
            )
            return images, cls

        pipe = pipeline()
        pipe.build()
        return pipe

    def _labels(self, cls) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        labels = torch.zeros(len(cls), dtype=torch.int64)
        bad = torch.zeros(len(cls), dtype=torch.bool)
        for i in range(len(cls)):
            raw = np.asarray(cls[i]).tobytes()
            try:
                label = int(raw.decode().strip())
            except (ValueError, UnicodeDecodeError):
                label = -1
            if not 0 <= label < self.num_classes:
                # source_info is "shard.tar:offset:key.cls": shard and key of the sample
                problem = f"label {raw[:20]!r} outside [0, {self.num_classes})"
                self.bad.record(cls[i].source_info(), problem)
                bad[i] = True
            labels[i] = label
        return labels, bad

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

    def _run(self, pipe, epoch: int, index: int):
        # DALI cannot skip an undecodable image; the converters decode every image first,
        # so this only meets shards changed or damaged after conversion
        try:
            return pipe.run()
        except RuntimeError as exc:
            where = self._find_undecodable(epoch, index)
            if not where:
                shards = self.shards.urls
                where = "one of " + ", ".join(shards[:4]) + (" ..." if len(shards) > 4 else "")
            raise ValueError(
                f"DALI failed reading/decoding batch {index} of epoch {epoch} ({where}): {exc}"
            ) from exc

    def _find_undecodable(self, epoch: int, index: int) -> str:
        """``shard.tar:offset:key.ext`` of the first image near batch ``index`` that Pillow
        cannot decode either ('' if none): replays the epoch's reader without decoding."""
        import io

        import numpy as np
        from PIL import Image

        last = index + self.cfg.dali_prefetch + 1  # DALI may fail while prefetching ahead
        pipe = self._build(epoch, decode=False)
        try:
            for batch in range(last + 1):
                encoded, _ = pipe.run()
                for i in range(len(encoded) if batch >= index - 1 else 0):
                    try:
                        with Image.open(io.BytesIO(np.asarray(encoded[i]).tobytes())) as img:
                            img.load()
                    except Exception:  # noqa: BLE001 - PIL raises many types for bad images
                        return encoded[i].source_info()
        except RuntimeError:
            return ""
        finally:
            del pipe
        return ""

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = self._build(epoch)
        dtype = DTYPES[self.cfg.output_dtype]
        try:
            for index in range(start):  # exact resume: same seed, so drop the consumed batches
                self._run(pipe, epoch, index)
            for index in itertools.count(start):
                images, cls = self._run(pipe, epoch, index)
                labels, bad = self._labels(cls)
                out = self._to_torch(images).to(dtype)
                out, labels, _ = repair_batch(out, labels, bad, "dali batch")
                yield out, labels.to(self.out_device, non_blocking=True)
        finally:
            del pipe
