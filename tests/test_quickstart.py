"""The README's first command: generated face folders, the quickstart script, side-by-side
quickstarts, and the CI entry point that runs it in a fresh virtualenv."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from dist_cosface.config import load_config
from dist_cosface.data.convert import ConvertOptions, convert
from dist_cosface.data.synth_shards import write_synthetic_image_folder
from dist_cosface.distributed import DistContext
from dist_cosface.metrics import build_metrics
from tools.check_run import run_problems

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = REPO / "configs" / "quickstart.yaml"


def test_synthetic_face_folders_convert_to_shards_with_disjoint_identities(tmp_path):
    train = write_synthetic_image_folder(tmp_path / "train", 5, 3, image_size=24)
    unseen = write_synthetic_image_folder(tmp_path / "unseen", 2, 4, first_identity=5)
    assert sorted(p.name for p in train.iterdir()) == [f"id00000{k}" for k in range(5)]
    assert sorted(p.name for p in unseen.iterdir()) == ["id000005", "id000006"]
    files = sorted(train.rglob("*.jpg"))
    assert len(files) == 15 and len(list(unseen.rglob("*.jpg"))) == 8
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and image.size == (24, 24)
    result = convert(train, tmp_path / "shards", ConvertOptions(shard_size=4, progress=False))
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_classes"] == 5 and manifest["num_samples"] == 15, result.summary()
    with pytest.raises(ValueError, match="already exists"):
        write_synthetic_image_folder(train, 1, 1)
    assert not list(tmp_path.glob("*.tmp-write"))


def test_synthetic_faces_of_one_identity_share_a_pattern(tmp_path):
    """Identity k looks the same whichever call renders it: held-out sets stay consistent."""
    import numpy as np

    a = write_synthetic_image_folder(tmp_path / "a", 3, 16, image_size=32)
    b = write_synthetic_image_folder(tmp_path / "b", 1, 16, first_identity=2, image_size=32)

    def mean_image(folder: Path) -> np.ndarray:
        return np.mean([np.asarray(Image.open(p), float) for p in sorted(folder.glob("*.jpg"))], 0)

    same = np.abs(mean_image(a / "id000002") - mean_image(b / "id000002")).mean()
    other = np.abs(mean_image(a / "id000001") - mean_image(b / "id000002")).mean()
    assert same < 0.5 * other


def test_exporters_of_two_quickstarts_never_collide(caplog):
    """The quickstart's metrics.port (0): every rank of every run gets its own free port."""
    cfg = load_config(str(QUICKSTART_CONFIG)).metrics
    assert cfg.enabled and cfg.port == 0
    exporters = []
    try:
        with caplog.at_level(logging.INFO, logger="dist_cosface.metrics.exporter"):
            for _run in range(2):
                for local_rank in range(2):
                    ctx = DistContext(rank=local_rank, local_rank=local_rank, world_size=2)
                    exporters.append(build_metrics(cfg, ctx, {"world_size": 2}))
        ports = [m.port for m in exporters]
        assert len(set(ports)) == 4 and all(ports)
        for port in ports:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            assert b"dist_cosface_samples_total" in body
            assert f"metrics at http://127.0.0.1:{port}/metrics" in caplog.text
    finally:
        for m in exporters:
            m.close()


def _quickstart(out: Path, *overrides: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, QUICKSTART_OUT=str(out), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        ["bash", str(REPO / "launch" / "quickstart.sh"), *overrides],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_quickstart_never_deletes_a_folder_it_did_not_make(tmp_path):
    keep = tmp_path / "precious.txt"
    keep.write_text("data")
    proc = _quickstart(tmp_path, log=tmp_path.parent / f"{tmp_path.name}.log")
    assert proc.wait(timeout=300) == 2
    assert "is not a quickstart folder" in (tmp_path.parent / f"{tmp_path.name}.log").read_text()
    assert keep.read_text() == "data"


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_quickstarts_at_once_both_finish_on_the_shard_path(tmp_path):
    short = ["train.total_steps=4", "train.log_every=2", "checkpoint.every_steps=2"]
    runs = [tmp_path / "a", tmp_path / "b"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_quickstart(out, *short, log=log) for out, log in zip(runs, logs)]
    codes = [proc.wait(timeout=900) for proc in procs]
    for out, log, code in zip(runs, logs, codes):
        text = log.read_text()
        assert code == 0, text[-4000:]
        assert run_problems(out / "run", ["training.png"]) == [], text[-4000:]
        loader = "DaliLoader (cpu decoding)" if _has_dali() else "WebDatasetLoader"
        assert f"data: {loader} from {out / 'shards'}" in text
        assert "2048 samples, 64 classes" in text  # the converter's summary
        assert f"run folder   {out / 'run'}" in text
        steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").open()]
        assert steps == [2, 4]


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def test_check_run_reports_what_a_run_is_missing(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    problems = run_problems(run, ["training.png"])
    assert len(problems) == 4  # metrics.jsonl, checkpoint, eval.json, training.png
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    (run / "checkpoints" / "step_2" / "meta.json").write_text("{}")
    (run / "training.png").write_bytes(b"png")
    (run / "eval.json").write_text(json.dumps({"lfw": {"accuracy": 0.9, "roc_png_error": "x"}}))
    assert run_problems(run, ["training.png"]) == [f"{run}/eval.json: lfw: roc_png_error: x"]


@pytest.mark.parametrize("tests_rc", [0, 3])
def test_ci_runs_the_test_suite_then_the_fresh_venv_quickstart(tmp_path, tests_rc):
    """.ci/run's exit status is the test suite's, and the quickstart check runs only after it
    passed (fake scripts stand in for the two; their real versions are what CI runs)."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "tools" / "test.sh").write_text(f"echo tests >> order.txt\nexit {tests_rc}\n")
    (tmp_path / "tools" / "ci_quickstart.sh").write_text("echo quickstart >> order.txt\nexit 5\n")
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], cwd="/", timeout=60)
    order = (tmp_path / "order.txt").read_text().split()
    if tests_rc:
        assert proc.returncode == tests_rc and order == ["tests"]
    else:
        assert proc.returncode == 5 and order == ["tests", "quickstart"]
