"""Checkpoints: files and atomicity, exact resume, load_backbone, the reshard tool."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_cosface.distributed import DistContext
from dist_cosface.engine import load_backbone, train
from dist_cosface.engine.checkpoint import find_latest_checkpoint
from dist_cosface.engine.reshard import merge_classifier, split_classifier
from dist_cosface.engine.rows import concat_payloads, gather_rows
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _payload(rows: int, start: int) -> dict:
    gen = torch.Generator().manual_seed(start)
    state = {
        "momentum_buffer": torch.randn(rows, 3, generator=gen),
        "row_step": torch.arange(start, start + rows, dtype=torch.float32),
        "shared": torch.tensor(7.0),  # not row-aligned: carried from the first shard
    }
    return {
        "weight": torch.randn(rows, 3, generator=gen),
        "optim": {"state": {0: state}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }


def test_rows_merge_and_split_round_trip():
    old = [(0, 4, _payload(4, 0)), (4, 3, _payload(3, 4))]  # 7 classes on 2 ranks
    full = gather_rows([(s, n, (lambda p=p: p)) for s, n, p in old], 0, 7)
    assert torch.equal(full["optim"]["state"][0]["row_step"], torch.arange(7.0))
    three = split_classifier(full, 3)
    assert [(s["class_start"], s["num_local"]) for s in three] == [(0, 3), (3, 2), (5, 2)]
    middle = three[1]
    assert torch.equal(
        middle["weight"], torch.cat([old[0][2]["weight"][3:], old[1][2]["weight"][:1]])
    )
    back = concat_payloads(three)
    for key in ("momentum_buffer", "row_step", "shared"):
        assert torch.equal(back["optim"]["state"][0][key], full["optim"]["state"][0][key])
    assert torch.equal(back["weight"], full["weight"])
    with pytest.raises(ValueError, match="cover 7 of the 8 rows"):
        gather_rows([(s, n, (lambda p=p: p)) for s, n, p in old], 0, 8)


def _run(out, *overrides):
    cfg = tiny_config(out, "optim.name=adamw", "checkpoint.every_steps=2", *overrides)
    return train(cfg, DistContext())


def _classifier(ckpt: Path) -> dict:
    return torch.load(ckpt / "classifier_rank0.pt", weights_only=True)


def test_checkpoint_layout_atomicity_and_exact_resume(tmp_path):
    run = tmp_path / "run"
    first = _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4"]
    step4 = ckpts / "step_4"
    assert {p.name for p in step4.iterdir()} == {
        "meta.json",
        "backbone.pt",
        "backbone_optim.pt",
        "classifier_rank0.pt",
        "trainer_rank0.pt",
    }
    for f in step4.glob("*.pt"):
        torch.load(f, weights_only=True)  # everything loads without pickle code execution
    meta = json.loads((step4 / "meta.json").read_text())
    assert meta["step"] == 4 and meta["class_layout"] == [[0, 8]] and meta["complete"]

    # A run killed while writing leaves a .tmp folder or a folder without meta.json:
    # neither counts. Drop step_4 so resuming starts from step_2.
    final_backbone = torch.load(step4 / "backbone.pt", weights_only=True)
    final_head = _classifier(step4)
    shutil.rmtree(step4)
    (ckpts / "step_6.tmp-write").mkdir()
    (ckpts / "step_5").mkdir()
    assert find_latest_checkpoint(run) == ckpts / "step_2"
    second = _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    assert second["resumed_from"] == str(ckpts / "step_2") and second["step"] == 4
    assert not (ckpts / "step_6.tmp-write").exists()  # stale partial writes are cleaned up
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-6)
    resumed = torch.load(step4 / "backbone.pt", weights_only=True)
    for key, value in final_backbone.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-7)
    head = _classifier(step4)
    torch.testing.assert_close(head["weight"], final_head["weight"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        head["optim"]["state"][0]["row_step"], final_head["optim"]["state"][0]["row_step"]
    )

    backbone, size = load_backbone(run)
    assert size == 32 and not backbone.training
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, resumed[key])


def test_reshard_tool_round_trip(tmp_path):
    run = tmp_path / "run"
    _run(run, "train.total_steps=2")
    src = run / "checkpoints" / "step_2"
    three = tmp_path / "three"
    tool = [sys.executable, str(REPO / "tools" / "reshard_checkpoint.py")]
    subprocess.run(
        [*tool, str(run), "--world-size", "3", "--out", str(three)],
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    meta = json.loads((three / "meta.json").read_text())
    assert meta["world_size"] == 3 and meta["class_layout"] == [[0, 3], [3, 3], [6, 2]]
    assert not list(three.glob("trainer_rank*"))  # per-rank positions do not carry over
    merged_file = tmp_path / "full.pt"
    subprocess.run([*tool, str(three), "--merged", str(merged_file)], check=True, timeout=120)
    merged = torch.load(merged_file, weights_only=True)
    original = _classifier(src)
    assert torch.equal(merged["weight"], original["weight"])
    for key, value in original["optim"]["state"][0].items():
        assert torch.equal(merged["optim"]["state"][0][key], value), key
    one = split_classifier(merge_classifier(three), 1)[0]
    assert torch.equal(one["weight"], original["weight"])
    bad = subprocess.run(
        [*tool, str(tmp_path / "nothing"), "--merged", "x.pt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no complete checkpoint" in bad.stderr


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
    assert set(meta["files"]) == {
        "backbone.pt",
        "backbone_optim.pt",
        "classifier_rank0.pt",
        "trainer_rank0.pt",
    }
    record = meta["files"]["classifier_rank0.pt"]
    assert record["size"] == (ckpts / "step_4" / "classifier_rank0.pt").stat().st_size
    final_backbone = torch.load(ckpts / "step_4" / "backbone.pt", weights_only=True)
    _halve(ckpts / "step_4" / "backbone.pt")  # the file a crash or a full disk cut short
    with caplog.at_level("WARNING"):
        second = _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    damaged = str(ckpts / "step_4" / "backbone.pt")
    assert any(damaged in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    assert second["resumed_from"] == str(ckpts / "step_2") and second["step"] == 4
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-6)  # exact resume from step 2
    resumed = torch.load(ckpts / "step_4" / "backbone.pt", weights_only=True)  # rewritten
    for key, value in final_backbone.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-7)


def test_corrupted_checkpoint_is_detected_by_checksum(tmp_path):
    from dist_cosface.engine.checkpoint import resolve_checkpoint

    run = tmp_path / "run"
    _run(run, "train.total_steps=4", "checkpoint.keep_last=2")
    ckpts = run / "checkpoints"
    assert resolve_checkpoint(run, DistContext()) == ckpts / "step_4"
    _flip_byte(ckpts / "step_4" / "classifier_rank0.pt")  # same size, other bytes
    assert resolve_checkpoint(run, DistContext()) == ckpts / "step_2"
    # a checkpoint named explicitly is not replaced by another one: it is an error
    with pytest.raises(ValueError, match=r"step_4/classifier_rank0\.pt: CRC32"):
        resolve_checkpoint(ckpts / "step_4", DistContext())
    load_backbone(ckpts / "step_4")  # evaluation reads (and verifies) the backbone only
    _flip_byte(ckpts / "step_4" / "backbone.pt")
    with pytest.raises(ValueError, match=r"step_4/backbone\.pt: CRC32"):
        load_backbone(ckpts / "step_4")
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
    # sorted files are verified round-robin: rank 1 reads trainer_rank0.pt, rank 0 does not
    _halve(run / "checkpoints" / "step_4" / "trainer_rank0.pt")
    chosen = run_ranks(2, _resolve_on_ranks, str(run), timeout_s=120)
    assert chosen == [str(run / "checkpoints" / "step_2")] * 2
