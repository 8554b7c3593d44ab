"""One line of checkpoints per run folder: nothing written by a run is pruned or replaced.

Resuming from a lower step into a folder that holds later checkpoints (or starting afresh
there) is refused by default, naming them and ``checkpoint.later_steps``; with ``archive``
they move into ``checkpoints/superseded-<step>/`` and the run goes on exactly. Pruning never
deletes the checkpoint just written; publishing never replaces a folder.
"""

from __future__ import annotations

import json

import pytest

from dist_cosface.distributed import DistContext
from dist_cosface.engine import train
from dist_cosface.engine.checkpoint import Checkpointer, resolve_checkpoint
from dist_cosface.engine.checkpoint.manager import _publish
from dist_cosface.engine.config import CheckpointConfig
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

_STEPS = ("train.total_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=2")


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_resume_below_later_checkpoints_refuses_or_archives(tmp_path):
    run = tmp_path / "run"
    first = train(tiny_config(run, *_STEPS), DistContext())
    ckpts = run / "checkpoints"
    assert _names(ckpts) == ["step_4", "step_6"]
    step6 = (ckpts / "step_6" / "meta.json").read_text()
    lower = f"checkpoint.resume={ckpts / 'step_4'}"
    for refused, later in ((lower, "(step_6)"), ("checkpoint.resume=none", "(step_4, step_6)")):
        with pytest.raises(ValueError) as error:
            train(tiny_config(run, *_STEPS, refused), DistContext())
        message = str(error.value)
        assert "\n" not in message and later in message
        assert "checkpoint.later_steps=archive" in message and str(ckpts) in message
        assert _names(ckpts) == ["step_4", "step_6"]  # nothing moved, nothing written
    second = train(
        tiny_config(run, *_STEPS, lower, "checkpoint.later_steps=archive"), DistContext()
    )
    assert second.resumed_from == str(ckpts / "step_4") and second.step == 6
    assert second.loss == pytest.approx(first.loss, rel=1e-6)  # the same line, exactly
    assert _names(ckpts) == ["step_4", "step_6", "superseded-4"]  # the new step_6 is kept
    kept = ckpts / "superseded-4" / "step_6"
    assert (kept / "meta.json").read_text() == step6
    assert resolve_checkpoint(kept, DistContext()) == kept  # intact, and resumable by path


def test_pruning_keeps_the_written_checkpoint_and_publish_replaces_nothing(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 3, 8):  # step_8: a later line the run must not touch
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "meta.json").write_text("{}")
    checkpointer = Checkpointer(CheckpointConfig(keep_last=1), root, DistContext())
    checkpointer._prune(root / "step_3")
    assert _names(root) == ["step_3", "step_8"]  # by step alone, step_3 would go
    tmp = root / "step_8.tmp-write"
    tmp.mkdir()
    with pytest.raises(FileExistsError, match="not replaced"):
        _publish(tmp, root / "step_8", {"step": 8})
    assert json.loads((root / "step_8" / "meta.json").read_text()) == {}
