"""A rank that fails stops the whole job quickly instead of leaving its peers hanging."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tools.spawn import torchrun_command

REPO = Path(__file__).resolve().parents[1]

# Rank 1's data source breaks at its third batch (say, a shard that became unreadable) while
# rank 0 goes on into the next step's collectives.
_SCRIPT = textwrap.dedent(
    """
    import sys
    from dist_cosface.config import load_config
    from dist_cosface.data import build_loader
    from dist_cosface.distributed import init_distributed
    from dist_cosface.engine import train

    class BreaksOnRankOne:
        def __init__(self, inner, rank):
            self.inner, self.rank = inner, rank

        def __len__(self):
            return len(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __iter__(self):
            for i, batch in enumerate(self.inner):
                if self.rank == 1 and i == 2:
                    raise OSError("injected failure on rank 1: shard unreadable")
                yield batch

    cfg = load_config(None, sys.argv[1:])
    ctx = init_distributed(cfg.dist)
    train(cfg, ctx, loader=BreaksOnRankOne(build_loader(cfg.data, ctx), ctx.rank))
    """
)


@pytest.mark.multiproc
def test_failing_rank_stops_the_job_long_before_the_collective_timeout(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    overrides = [
        "model.input_size=32",
        "model.embedding_size=16",
        "data.image_size=32",
        "data.batch_size=4",
        "data.synthetic_num_classes=8",
        "classifier.num_classes=8",
        "metrics.enabled=false",
        "checkpoint.every_steps=0",
        "train.total_steps=50",
        f"train.output_dir={tmp_path / 'run'}",
        "dist.timeout_s=300",  # a hang would last this long; the job must end far sooner
    ]
    cmd = torchrun_command(2, str(script), *overrides)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "injected failure on rank 1" in output, output[-3000:]
    assert elapsed < 120, f"job took {elapsed:.0f}s to stop: the healthy rank hung"
