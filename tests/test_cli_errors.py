"""Every known failure of the command line is one ``error:`` line: status 2 for usage errors,
1 for failures while running; ``--debug`` or DIST_COSFACE_DEBUG=1 shows the traceback.

In-process ``cli.main`` calls for the cases, one real torchrun job for the per-rank lines.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_cosface.cli import main
from tests.data_common import unique_label_dataset
from tests.tiny import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def _fails(capsys, argv: list[str], status: int) -> str:
    """``main(argv)`` exits with ``status`` after exactly one stderr line; returns that line."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == status, err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err.strip()


@pytest.fixture
def paths(tmp_path):
    """{dir}: an existing folder, {file}: an existing file, {missing}: nothing there."""
    (tmp_path / "file.txt").write_text("x\n")
    return {"dir": str(tmp_path), "file": str(tmp_path / "file.txt"), "missing": "/no/such"}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "{missing}", "--target", "{file}"], "argument checkpoint: /no/such: not found"),
        (["eval", "{dir}", "--target", "{missing}"], "argument --target: /no/such: not found"),
        (["eval", "{dir}", "--target", "{file}", "--device", "xyz"], "'xyz' is not a device"),
        (["eval", "{dir}", "--target", "{file}", "--out-dir", "{file}"], "is a file, not a folder"),
        (["eval", "{dir}", "--ytf", "{file}", "{dir}", "--max-frames", "0"], "must be >= 1, got 0"),
        (["eval", "{dir}", "--ytf", "{file}", "{dir}", "--max-frames=-3"], "must be >= 1, got -3"),
        (["eval", "{dir}", "--target", "{file}", "--far", "nan"], "--far: must be in (0, 1)"),
        (["eval", "{dir}", "--ijb", "{file}", "ijbc"], "--ijb {file}: not a folder"),
        (["eval", "{dir}"], "nothing to evaluate: give --target"),
        (["export", "{missing}", "{dir}/m.onnx"], "argument checkpoint: /no/such: not found"),
        (["export", "{dir}", "{dir}"], "argument out: {dir}: is a folder"),
        (["export", "{dir}", "{file}/m.onnx"], "{file} is a file"),
        (["synthetic-faces", "{dir}/f", "--image-size", "100000"], "must be in [16, 1024]"),
        (["synthetic-faces", "{dir}"], "argument out_dir: {dir}: already exists"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, paths, argv, needle):
    argv = [a.format(**paths) for a in argv]
    line = _fails(capsys, argv, 2)
    assert line.startswith(f"dist-cosface {argv[0]}: error: "), line
    assert needle.format(**paths) in line, line


def test_debug_flag_and_environment_show_the_exception(paths, monkeypatch, capsys):
    from dist_cosface.cliargs import UsageError

    for argv in (["--debug", "eval", paths["dir"]], ["eval", "--debug", paths["dir"]]):
        with pytest.raises(UsageError, match="nothing to evaluate"):
            main(argv)
    monkeypatch.setenv("DIST_COSFACE_DEBUG", "1")
    with pytest.raises(UsageError, match="nothing to evaluate"):
        main(["eval", paths["dir"]])
    monkeypatch.setenv("DIST_COSFACE_DEBUG", "0")
    assert "nothing to evaluate" in _fails(capsys, ["eval", paths["dir"]], 2)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """16 samples of 16 classes in one shard."""
    out = tmp_path_factory.mktemp("cli") / "shards"
    unique_label_dataset(out, 16, shard_size=16)
    return out


def _train_argv(tmp_path, shard_set, *overrides):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  seed: 0\n")
    base = [
        *TINY_OVERRIDES,
        "data.backend=webdataset",
        f"data.path={shard_set}",
        "data.num_workers=0",
        "classifier.num_classes=16",
        "train.total_steps=1",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    return ["train", str(cfg), *base, *overrides]


@pytest.mark.parametrize(
    ("overrides", "status", "needle"),
    [
        (["data.path={tmp}/nothing"], 2, "config error: data.path='{tmp}/nothing': not found"),
        (["checkpoint.resume={tmp}/nothing"], 2, "config error: checkpoint.resume='{tmp}/nothing'"),
        (["train.output_dir={tmp}/run.yaml"], 2, "run.yaml': is a file, not a folder"),
        (["classifier.num_classes=9"], 1, "error: classifier.num_classes=9 but the data has 16"),
        (["data.batch_size=32"], 1, "error: the data gives this rank no full batch"),
    ],
)
def test_train_start_up_errors_are_one_line(tmp_path, capsys, shard_set, overrides, status, needle):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    line = _fails(capsys, _train_argv(tmp_path, shard_set, *overrides), status)
    assert line.startswith("dist-cosface train: ") and needle.format(tmp=tmp_path) in line, line


def _hold_lock(folder: Path) -> int:
    """Take the run folder's lock as another job would (flock on ``<folder>/.lock``)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_locked_run_folder_is_one_line_and_exit_1(tmp_path, capsys, shard_set):
    fd = _hold_lock(tmp_path / "run")
    try:
        line = _fails(capsys, _train_argv(tmp_path, shard_set), 1)
    finally:
        os.close(fd)
    assert line.startswith("dist-cosface train: error: run folder ") and "in use" in line


def test_unexpected_exception_is_one_line_naming_its_type(capsys, monkeypatch, paths):
    import dist_cosface.eval.cli as eval_cli

    def broken(args, load_backbone):
        raise KeyError("boom")

    monkeypatch.setattr(eval_cli, "run_eval_command", broken)
    line = _fails(capsys, ["eval", paths["dir"]], 1)
    assert "error: KeyError: 'boom' (unexpected: rerun with --debug" in line


@pytest.mark.multiproc
def test_every_torchrun_rank_prints_one_line(tmp_path):
    """2 ranks meet a locked run folder after building the process group: each rank's stderr
    is exactly its one line (torchrun's own summary goes to the launcher's stderr)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  seed: 0\n")
    out = tmp_path / "run"
    fd = _hold_lock(out)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        f"--log-dir={tmp_path / 'logs'}",
        "--redirects=3",  # each rank's stdout/stderr in its own file
        "-m",
        "dist_cosface.cli",
        "train",
        str(cfg),
        *TINY_OVERRIDES,
        "dist.timeout_s=60",
        f"train.output_dir={out}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, timeout=240)
    finally:
        os.close(fd)
    assert proc.returncode == 1, proc.stderr.decode()[-3000:]
    for rank in (0, 1):
        (err,) = (tmp_path / "logs").rglob(f"attempt_0/{rank}/stderr.log")
        lines = err.read_text().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"dist-cosface train (rank {rank}): error: run folder {out}")
