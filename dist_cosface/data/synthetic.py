"""Generated, learnable identities: no files, deterministic per (seed, rank, epoch, batch).

Each identity is a smooth random pattern (a low-resolution random field, upsampled); a sample
is its identity's pattern, shifted by a few pixels, with a random brightness change and
per-pixel noise. A model can learn to tell identities apart, so loss curves mean something,
and a batch costs a few milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from dist_cosface.data.base import DTYPES, BaseLoader
from dist_cosface.data.config import DataConfig
from dist_cosface.distributed import DistContext
from dist_cosface.seeding import stable_seed

_PATTERN_RES = 8  # identity patterns are drawn at this resolution, then upsampled
_MAX_SHIFT = 4  # pixels of jitter


class SyntheticLoader(BaseLoader):
    def __init__(self, cfg: DataConfig, ctx: DistContext):
        total = cfg.synthetic_num_classes * cfg.synthetic_samples_per_class
        super().__init__(total // ctx.world_size // cfg.batch_size, cfg.synthetic_num_classes)
        self.cfg, self.rank, self.world_size = cfg, ctx.rank, ctx.world_size
        self.dtype = DTYPES[cfg.output_dtype]

    def _epoch_labels(self, epoch: int) -> torch.Tensor:
        """This rank's labels for the epoch: a disjoint slice of a shared permutation."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(stable_seed(cfg.seed, epoch))
        total = cfg.synthetic_num_classes * cfg.synthetic_samples_per_class
        order = torch.randperm(total, generator=gen)
        per_rank = total // self.world_size
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return mine % cfg.synthetic_num_classes

    def _patterns(self, labels: torch.Tensor) -> torch.Tensor:
        res = _PATTERN_RES
        out = torch.empty(len(labels), 3, res, res)
        for i, label in enumerate(labels.tolist()):
            gen = torch.Generator().manual_seed(stable_seed(self.cfg.seed, 7919, label))
            out[i] = torch.randn(3, res, res, generator=gen)
        return out

    def make_batch(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        size, n = self.cfg.image_size, len(labels)
        big = size + 2 * _MAX_SHIFT
        faces = F.interpolate(self._patterns(labels), size=(big, big), mode="bilinear")
        dx, dy = torch.randint(0, 2 * _MAX_SHIFT + 1, (2, n), generator=gen).tolist()
        crops = torch.stack(
            [faces[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size] for i in range(n)]
        )
        brightness = 0.2 * torch.randn(n, 1, 1, 1, generator=gen)
        images = torch.randn(crops.shape, generator=gen).mul_(self.cfg.synthetic_noise)
        images.add_(crops, alpha=0.8).add_(brightness).clamp_(-1.0, 1.0)
        if self.cfg.random_flip:
            flip = torch.rand(n, generator=gen) < 0.5
            images[flip] = images[flip].flip(-1)
        return images.to(self.dtype)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        labels = self._epoch_labels(epoch)
        bs = self.cfg.batch_size
        for b in range(start, self.num_batches):
            gen = torch.Generator().manual_seed(stable_seed(self.cfg.seed, epoch, self.rank, b))
            batch_labels = labels[b * bs : (b + 1) * bs].clone()
            yield self.make_batch(batch_labels, gen), batch_labels
