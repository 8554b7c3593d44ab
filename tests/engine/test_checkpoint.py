"""Checkpoints: DCP files and atomicity, exact resume, async saves, load_backbone, merging."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_cosface.distributed import DistContext
from dist_cosface.engine import load_backbone, train
from dist_cosface.engine.checkpoint import find_latest_checkpoint, read_tree, read_value
from tests.tiny import tiny_config

RANK0_FILE = "__0_0.distcp"  # DCP: rank 0's part of the state tree


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out, *overrides):
    cfg = tiny_config(out, "optim.name=adamw", "checkpoint.every_steps=2", *overrides)
    return train(cfg, DistContext())


def _assert_same_tree(got: dict, want: dict, rtol=0.0, atol=0.0) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=rtol, atol=atol, msg=key)
        else:
            assert got[key] == value, key


def test_checkpoint_layout_atomicity_and_exact_resume(tmp_path):
    run = tmp_path / "run"
    first = _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4"]
    step4 = ckpts / "step_4"
    assert {p.name for p in step4.iterdir()} == {"meta.json", ".metadata", RANK0_FILE}
    meta = json.loads((step4 / "meta.json").read_text())
    assert meta["step"] == 4 and meta["class_layout"] == [[0, 8]] and meta["complete"]
    assert set(meta["files"]) == {".metadata", RANK0_FILE}

    # A run killed while writing leaves a .tmp folder or a folder without meta.json:
    # neither counts. Drop step_4 so resuming starts from step_2.
    final_backbone = read_tree(step4, "backbone.")
    final_head = read_tree(step4, "classifier.")
    assert set(final_head) == {
        "classifier.weight",
        "classifier.optim.exp_avg",
        "classifier.optim.exp_avg_sq",
        "classifier.optim.row_step",
    }
    shutil.rmtree(step4)
    (ckpts / "step_6.tmp-write").mkdir()
    shutil.copytree(ckpts / "step_2", ckpts / "step_5")
    (ckpts / "step_5" / "meta.json").unlink()  # all data written, never published
    assert find_latest_checkpoint(run) == ckpts / "step_2"
    second = _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    assert second.resumed_from == str(ckpts / "step_2") and second.step == 4
    assert not (ckpts / "step_6.tmp-write").exists()  # stale partial writes are cleaned up
    assert second.loss == pytest.approx(first.loss, rel=1e-6)
    _assert_same_tree(read_tree(step4, "backbone."), final_backbone, rtol=1e-6, atol=1e-7)
    _assert_same_tree(read_tree(step4, "classifier."), final_head, rtol=1e-6, atol=1e-7)

    backbone, size = load_backbone(run)
    assert size == 32 and not backbone.training
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, read_value(step4, f"backbone.model.{key}"))


def test_merge_classifier_command(tmp_path, capsys):
    from dist_cosface.cli import main

    run = tmp_path / "run"
    _run(run, "train.total_steps=2")
    src = run / "checkpoints" / "step_2"
    merged_file = tmp_path / "full.pt"
    assert main(["merge-classifier", str(run), str(merged_file)]) == 0
    merged = torch.load(merged_file, weights_only=True)
    assert merged["num_classes"] == 8
    assert torch.equal(merged["weight"], read_value(src, "classifier.weight"))
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(merged["optim"][key], read_value(src, f"classifier.optim.{key}"))
    assert main(["merge-classifier", str(tmp_path / "nothing"), "x.pt"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def _parts_and_state(out: Path, async_save: bool):
    from dist_cosface.engine.checkpoint import Checkpointer
    from dist_cosface.engine.config import CheckpointConfig
    from dist_cosface.engine.trainer import Trainer

    cfg = tiny_config(out, "optim.name=adamw")
    trainer = Trainer(cfg, DistContext())
    settings = CheckpointConfig(keep_last=2, async_save=async_save)
    checkpointer = Checkpointer(settings, out, DistContext())
    return trainer.strategy, checkpointer, trainer.state


_META = {"epoch": 0, "num_classes": 8}


def test_async_save_snapshot_is_isolated_from_later_updates(tmp_path):
    parts, checkpointer, state = _parts_and_state(tmp_path, async_save=True)
    before = {k: v.clone() for k, v in parts.backbone.state_dict().items()}
    weight = state.classifier.head.weight.detach().clone()
    checkpointer.save(1, state, _META)
    with torch.no_grad():  # training goes on while the writer thread may still run
        state.classifier.head.weight.add_(1.0)
        for value in parts.backbone.state_dict().values():
            value.add_(1)
    assert checkpointer.wait() == tmp_path / "step_1"
    assert torch.equal(read_value(tmp_path / "step_1", "classifier.weight"), weight)
    for key, value in before.items():
        assert torch.equal(read_value(tmp_path / "step_1", f"backbone.model.{key}"), value)


def test_async_save_error_surfaces_at_wait_and_publishes_nothing(tmp_path, monkeypatch):
    import dist_cosface.engine.checkpoint.manager as checkpoint

    parts, checkpointer, state = _parts_and_state(tmp_path, async_save=True)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "run_dcp", disk_full)
    checkpointer.save(1, state, _META)  # returns: the failure happens in the writer thread
    with pytest.raises(OSError, match="No space left"):
        checkpointer.wait()
    assert find_latest_checkpoint(tmp_path) is None  # nothing half-written looks complete


def _halve(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    run = tmp_path / "run"
    first = _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    ckpts = run / "checkpoints"
    meta = json.loads((ckpts / "step_4" / "meta.json").read_text())
    record = meta["files"][RANK0_FILE]
    assert record["size"] == (ckpts / "step_4" / RANK0_FILE).stat().st_size
    final_backbone = read_tree(ckpts / "step_4", "backbone.")
    _halve(ckpts / "step_4" / RANK0_FILE)  # the file a crash or a full disk cut short
    with caplog.at_level("WARNING"):
        second = _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    damaged = str(ckpts / "step_4" / RANK0_FILE)
    assert any(damaged in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    assert second.resumed_from == str(ckpts / "step_2") and second.step == 4
    assert second.loss == pytest.approx(first.loss, rel=1e-6)  # exact resume from step 2
    resumed = read_tree(ckpts / "step_4", "backbone.")  # rewritten
    _assert_same_tree(resumed, final_backbone, rtol=1e-6, atol=1e-7)


def test_corrupted_checkpoint_is_detected_by_checksum(tmp_path):
    from dist_cosface.engine.checkpoint import resolve_checkpoint

    run = tmp_path / "run"
    _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    ckpts = run / "checkpoints"
    assert resolve_checkpoint(run, DistContext()) == ckpts / "step_4"
    load_backbone(ckpts / "step_4")
    _flip_byte(ckpts / "step_4" / RANK0_FILE)  # same size, other bytes
    assert resolve_checkpoint(run, DistContext()) == ckpts / "step_2"
    # a checkpoint named explicitly is not replaced by another one: it is an error
    with pytest.raises(ValueError, match=r"step_4/__0_0\.distcp: CRC32"):
        resolve_checkpoint(ckpts / "step_4", DistContext())
    with pytest.raises(ValueError, match=r"step_4/__0_0\.distcp: CRC32"):
        load_backbone(ckpts / "step_4")  # evaluation verifies the files holding the backbone
    (ckpts / "step_2" / "meta.json").write_text('{"step": 2, "files"')  # cut short
    with pytest.raises(ValueError, match="no intact checkpoint.*checkpoint.resume=none"):
        resolve_checkpoint(run, DistContext())


def _resolve_on_ranks(rank, world, run):
    import torch.distributed as dist

    from dist_cosface.distributed import context_from_group
    from dist_cosface.engine.checkpoint import resolve_checkpoint

    return str(resolve_checkpoint(run, context_from_group(dist.group.WORLD, torch.device("cpu"))))


@pytest.mark.multiproc
def test_ranks_agree_on_the_fallback_when_one_rank_finds_the_damage(tmp_path):
    from tests.multiproc import run_ranks

    run = tmp_path / "run"
    _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    # sorted files are verified round-robin: rank 1 reads __0_0.distcp, rank 0 does not
    _halve(run / "checkpoints" / "step_4" / RANK0_FILE)
    chosen = run_ranks(2, _resolve_on_ranks, str(run), timeout_s=120)
    assert chosen == [str(run / "checkpoints" / "step_2")] * 2
