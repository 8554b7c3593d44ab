"""A run's results survive its evaluation: eval targets are checked before training, and an
evaluation or plotting failure after training is recorded instead of failing the run."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_cosface.config import load_config
from dist_cosface.distributed import DistContext
from dist_cosface.engine import RunSummary, train
from dist_cosface.eval import EvalConfig, write_bin
from dist_cosface.eval.targets import check_targets
from tests.tiny import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL_SETTINGS = ["eval.batch_size=8", "eval.n_folds=2"]


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def good_bin(path: Path, num_pairs: int = 4) -> Path:
    return write_bin(
        path, [jpeg(i) for i in range(2 * num_pairs)], [True, False] * (num_pairs // 2)
    )


def pairs_folder(root: Path, images: list[bytes]) -> Path:
    """An LFW-style folder: ``pairs.txt`` in the ``path1 path2 label`` format and the images."""
    root.mkdir(parents=True)
    for i, data in enumerate(images):
        (root / f"{i}.jpg").write_bytes(data)
    lines = [f"{2 * p}.jpg {2 * p + 1}.jpg {1 - p % 2}" for p in range(len(images) // 2)]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


class _RunsShell:
    """Unpickling this would run a shell command (the payload of a malicious .bin)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_cfg(out: Path, *overrides: str):
    base = [*TINY_OVERRIDES, "train.total_steps=2", "checkpoint.every_steps=0"]
    return load_config(None, [*base, f"train.output_dir={out}", *EVAL_SETTINGS, *overrides])


def run_train(launcher: list[str], run: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``dist-cosface train`` of the tiny synthetic setup as a subprocess (under ``launcher``)."""
    cmd = [sys.executable, *launcher, "-m", "dist_cosface.cli", "train"]
    cmd += [str(REPO / "configs" / "quickstart.yaml"), *TINY_OVERRIDES, "data.backend=synthetic"]
    cmd += ["checkpoint.every_steps=0", f"train.output_dir={run}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


# ------------------------------------------------------------------ start-up checks


def _bad_targets(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (target, a fragment the error must contain)."""
    marker = tmp / "pwned"
    unsafe = tmp / "unsafe.bin"
    unsafe.write_bytes(pickle.dumps(([_RunsShell(marker)], [True]), protocol=2))
    truncated = tmp / "truncated.bin"
    truncated.write_bytes(good_bin(tmp / "whole.bin").read_bytes()[:200])
    bad_line = pairs_folder(tmp / "badline", [jpeg(i) for i in range(4)])
    (bad_line / "pairs.txt").write_text("0.jpg 1.jpg 1\n2.jpg 3.jpg 1 extra words\n")
    no_image = pairs_folder(tmp / "noimage", [jpeg(i) for i in range(4)])
    (no_image / "3.jpg").unlink()
    not_jpeg = pairs_folder(tmp / "notjpeg", [jpeg(i) for i in range(3)] + [b"not an image"])
    binary_pairs = tmp / "pairs_binary.txt"
    binary_pairs.write_bytes(b"\xff\xfe\x00\x81" * 8)
    return {
        "missing": (tmp / "absent.bin", "not found"),
        "unsafe": (unsafe, "unsafe"),
        "truncated": (truncated, "truncated"),
        "bad_line": (bad_line, "pairs.txt:2"),
        "no_image": (no_image, "3.jpg"),
        "not_jpeg": (not_jpeg, "cannot decode"),
        "binary_pairs": (binary_pairs, "not a text pairs file"),
        "too_few_pairs": (good_bin(tmp / "small.bin", num_pairs=2), "eval.n_folds=4"),
    }


def test_check_targets_names_the_file_of_every_kind_of_bad_target(tmp_path):
    for name, (target, fragment) in _bad_targets(tmp_path).items():
        cfg = EvalConfig(targets=[str(target)], n_folds=4 if name == "too_few_pairs" else 2)
        with pytest.raises(ValueError) as err:
            check_targets(cfg)
        message = str(err.value)
        assert message.startswith("eval.targets"), (name, message)
        assert str(target) in message and fragment in message, (name, message)
    assert not (tmp_path / "pwned").exists()  # the unsafe pickle was refused, not run


def test_check_targets_accepts_good_sets_and_rejects_duplicate_names(tmp_path):
    ok_bin = good_bin(tmp_path / "a" / "lfw.bin")
    ok_folder = pairs_folder(tmp_path / "cfp", [jpeg(i) for i in range(8)])
    sets = check_targets(EvalConfig(targets=[str(ok_bin), str(ok_folder)], n_folds=2))
    assert {name: s.num_pairs for name, s in sets.items()} == {"lfw": 4, "cfp": 4}
    twin = good_bin(tmp_path / "b" / "lfw.bin")
    with pytest.raises(ValueError, match="two targets are named 'lfw'"):
        check_targets(EvalConfig(targets=[str(ok_bin), str(twin)], n_folds=2))


def test_train_rejects_an_unsafe_target_before_building_anything(tmp_path):
    target, _ = _bad_targets(tmp_path)["unsafe"]
    cfg = tiny_cfg(tmp_path / "run", f"eval.targets=[{target}]")
    with pytest.raises(ValueError, match=f"eval.targets: {target}: unsafe"):
        train(cfg, DistContext())
    assert not (tmp_path / "run").exists()  # no run folder, no step taken
    assert not (tmp_path / "pwned").exists()


@pytest.mark.multiproc
def test_torchrun_job_with_a_bad_target_fails_at_start_naming_it(tmp_path):
    bad = pairs_folder(tmp_path / "lfw", [jpeg(i) for i in range(4)])
    (bad / "pairs.txt").write_text("0.jpg 1.jpg 1\nthis line is not a pair\n")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = tmp_path / "run"
    proc = run_train(torchrun, run, "train.total_steps=1000", f"eval.targets=[{bad}]")
    assert proc.returncode != 0
    assert f"error: eval.targets: {bad / 'pairs.txt'}:2: cannot parse" in proc.stderr
    assert not (run / "metrics.jsonl").exists()


# ------------------------------------------------------------- failures after training


def _assert_training_results_kept(run: Path, summary: RunSummary) -> None:
    assert summary.step == 2 and summary.checkpoint is not None
    assert (run / "checkpoints" / "step_2" / "meta.json").is_file()
    assert [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ] == [
        1,
        2,
    ]


def test_missing_matplotlib_keeps_the_metrics_and_records_the_plot_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    target = good_bin(tmp_path / "lfw.bin")
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, f"eval.targets=[{target}]"), DistContext())
    _assert_training_results_kept(run, summary)
    result = json.loads((run / "eval.json").read_text())["lfw"]
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_pairs"] == 4
    assert "ModuleNotFoundError" in result["roc_png_error"] and "roc_png" not in result
    assert json.loads(json.dumps(summary.eval))["lfw"] == result  # JSON keys are strings
    assert not list(run.glob("*.png"))


def test_a_target_that_breaks_during_eval_is_recorded_and_the_others_evaluated(tmp_path):
    good = good_bin(tmp_path / "lfw.bin")
    images = [jpeg(i) for i in range(8)]
    images[3] = b"corrupt"  # the start-up check decodes the first and last image only
    broken = pairs_folder(tmp_path / "cfp", images)
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, f"eval.targets=[{good},{broken}]"), DistContext())
    _assert_training_results_kept(run, summary)
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"lfw", "cfp"}
    assert 0.0 <= results["lfw"]["accuracy"] <= 1.0 and Path(results["lfw"]["roc_png"]).is_file()
    assert "accuracy" not in results["cfp"]
    assert "cannot decode image" in results["cfp"]["error"] and "3.jpg" in results["cfp"]["error"]
    assert json.loads(json.dumps(summary.eval)) == results


def test_dist_cosface_train_exits_zero_when_its_final_evaluation_fails(tmp_path):
    images = [jpeg(i) for i in range(8)]
    images[5] = b"corrupt"
    broken = pairs_folder(tmp_path / "cfp", images)
    run = tmp_path / "run"
    proc = run_train([], run, "train.total_steps=2", f"eval.targets=[{broken}]", *EVAL_SETTINGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval cfp: FAILED (ValueError:" in proc.stdout
    assert "evaluation on" in proc.stderr and "5.jpg" in proc.stderr  # the logged error
    assert "error" in json.loads((run / "eval.json").read_text())["cfp"]
    assert (run / "checkpoints" / "step_2" / "meta.json").is_file()
