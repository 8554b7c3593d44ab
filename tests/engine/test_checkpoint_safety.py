"""Checkpoints from elsewhere run nothing; one line of checkpoints per run folder.

A crafted checkpoint whose DCP index (``.metadata``) or one of whose entries is a pickle that
would run a command is refused by ``eval``, ``export``, ``merge-classifier`` and resume, with
meta.json's CRC32s stale (caught by verification, before any unpickling) or updated to match
(caught by the allow-lists of ``engine/checkpoint/safe.py``); the command never runs. Format-3
checkpoints (non-tensor values pickled by DCP) still resume exactly, through weights-only
loading.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from dist_cosface.distributed import DistContext
from dist_cosface.engine import load_backbone, train
from dist_cosface.engine.checkpoint.files import file_record
from dist_cosface.engine.checkpoint.reader import merge_classifier, read_tree
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class RunsCommand:
    """Pickles as ``os.system("touch MARKER")``: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def rerecord_files(ckpt: Path, **changes) -> None:
    """meta.json with fresh size/CRC32 records of every file (a tamperer's update)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {name: file_record(ckpt / name) for name in meta["files"]}
    meta.update(changes)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _crafted_index(src: Path, dest: Path, marker: Path, rerecord: bool) -> Path:
    shutil.copytree(src, dest)
    (dest / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    if rerecord:
        rerecord_files(dest)
    return dest


def _crafted_entry(src: Path, dest: Path, marker: Path, cfg, version: int) -> Path:
    """``src`` rewritten by DCP with its loader position replaced by a command (a pickled
    entry, as format 3 stored non-tensor values), meta.json claiming ``version``."""
    import torch.distributed.checkpoint as dcp

    from dist_cosface.engine.trainer import Trainer

    tree = Trainer(cfg, DistContext()).state.template(True, encoded=False)
    tree["rank0"]["loader"]["epoch"] = RunsCommand(marker)
    dcp.save(tree, storage_writer=dcp.FileSystemWriter(str(dest)), no_dist=True)
    shutil.copy(src / "meta.json", dest / "meta.json")
    rerecord_files(dest, format_version=version)
    return dest


def _refusal(run, capsys, ckpt: Path) -> str:
    """The one line a command printed (the CLI: one ``error:`` line and a non-zero exit) or
    raised (resume through ``train``) when refusing ``ckpt``."""
    try:
        code = run()
    except ValueError as exc:
        message = str(exc)
    except SystemExit as exc:  # the CLI's one-line failure
        assert exc.code not in (0, None)
        message = _one_error_line(capsys, ckpt)
    else:
        assert code != 0
        message = _one_error_line(capsys, ckpt)
    assert "\n" not in message.strip()
    return message


def _one_error_line(capsys, ckpt: Path) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if str(ckpt) in line)


def _commands(ckpt: Path, tmp_path: Path, target: Path) -> dict:
    """Every reader of a checkpoint, as a call returning an exit code (or raising)."""
    from dist_cosface.cli import main

    out = tmp_path / "out"
    resume = tiny_config(tmp_path / "resumed", f"checkpoint.resume={ckpt}")
    return {
        "eval": lambda: main(["eval", str(ckpt), "--target", str(target)]),
        "export": lambda: main(["export", str(ckpt), str(out / "m.onnx")]),
        "merge-classifier": lambda: main(["merge-classifier", str(ckpt), str(out / "m.pt")]),
        "resume": lambda: train(resume, DistContext()),
    }


def test_crafted_checkpoints_are_refused_and_run_nothing(tmp_path, capsys):
    from tests.eval_sets import yaleb_bin

    run = tmp_path / "run"
    cfg = tiny_config(run, "train.total_steps=2", "checkpoint.every_steps=2")
    train(cfg, DistContext())
    good = run / "checkpoints" / "step_2"
    marker = tmp_path / "marker"
    target = yaleb_bin(tmp_path / "yb.bin")
    cases = {  # crafted checkpoint -> what the refusal says
        _crafted_index(good, tmp_path / "index_stale", marker, rerecord=False): (
            r"\.metadata: \d+ bytes, \d+ recorded"  # verified before anything is unpickled
        ),
        _crafted_index(good, tmp_path / "index", marker, rerecord=True): (
            r"\.metadata refused: it names posix\.system, which no DCP index holds"
        ),
        _crafted_entry(good, tmp_path / "entry4", marker, cfg, version=4): (
            r"entry '[\w.]+' is a pickled object, which a format-4"
        ),
    }
    for ckpt, refusal in cases.items():
        for name, command in _commands(ckpt, tmp_path, target).items():
            message = _refusal(command, capsys, ckpt)
            assert str(ckpt) in message and re.search(refusal, message), (name, message)
            assert not marker.exists(), (name, ckpt)
    # format 3 pickled its non-tensor entries: they load weights-only, which refuses this one
    entry_v3 = _crafted_entry(good, tmp_path / "entry3", marker, cfg, version=3)
    with pytest.raises(ValueError, match=r"'rank0\.loader\.epoch' refused: it names posix\.sys"):
        _commands(entry_v3, tmp_path, target)["resume"]()
    assert merge_classifier(entry_v3)["num_classes"] == 8  # tensors only: never touches it
    assert not marker.exists()


def test_format_3_checkpoints_resume_exactly(tmp_path, monkeypatch):
    """A run resumed from a format-3 checkpoint (non-tensor values pickled) ends where the
    uninterrupted run ends, the pickled values loaded weights-only."""
    import dist_cosface.engine.checkpoint.manager as checkpoint
    import dist_cosface.engine.checkpoint.train_state as train_state

    run, steps = tmp_path / "run", ("train.total_steps=4", "checkpoint.every_steps=2")
    with monkeypatch.context() as old:  # what the code before format 4 wrote
        old.setattr(train_state, "encode_plain", lambda tree: tree)
        old.setattr(checkpoint, "FORMAT_VERSION", 3)
        first = train(tiny_config(run, *steps), DistContext())
    step2 = run / "checkpoints" / "step_2"
    assert json.loads((step2 / "meta.json").read_text())["format_version"] == 3
    assert read_tree(step2, "rank0.loader.")["rank0.loader.batches_consumed"] == 2
    shutil.rmtree(run / "checkpoints" / "step_4")
    second = train(tiny_config(run, *steps), DistContext())
    assert second.resumed_from == str(step2)
    assert second.loss == pytest.approx(first.loss, rel=1e-6)
    assert (
        json.loads((run / "checkpoints" / "step_4" / "meta.json").read_text())["format_version"]
        == 4
    )  # noqa: E501
    backbone, _ = load_backbone(step2)  # evaluation reads format 3 as well
    assert torch.equal(
        backbone.state_dict()["features.0.0.weight"],
        read_tree(step2, "backbone.model.features.0.0.weight")[
            "backbone.model.features.0.0.weight"
        ],
    )


def test_non_tensor_values_round_trip_as_json():
    """What loaders, RNGs and optimizers keep beside tensors comes back equal, types and all."""
    import random

    import numpy as np

    from dist_cosface.engine.checkpoint.safe import decode_plain, encode_plain

    plain = {
        "python": random.getstate(),  # a tuple holding a tuple of 625 ints
        "position": np.int64(5),
        "lost": {"shard-3/key9", "shard-0/key1"},
        "by_id": {1: (2, 3.5)},
        "looks_tagged": {"__tuple__": 1},
        "empty": {},
        "huge": 2**80,
        "scale": float("inf"),
    }
    tree = {"rank0": {"rng": {"torch": torch.arange(3)}, "loader": dict(plain)}}
    encoded = encode_plain(tree)
    assert (
        set(encoded["rank0"]) == {"rng", "_json"} and encoded["rank0"]["_json"].dtype == torch.uint8
    )
    decoded = decode_plain(encoded)
    assert torch.equal(decoded["rank0"]["rng"]["torch"], torch.arange(3))
    assert decoded["rank0"]["loader"] == plain
    with pytest.raises(TypeError, match=r"rank0\.loader\.f: a bytes is neither a tensor"):
        encode_plain({"rank0": {"loader": {"f": b"x"}, "t": torch.zeros(1)}})
