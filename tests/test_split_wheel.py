"""tools/split_wheel.py: wheels cut into pieces below the size limit and reassembled exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "split_wheel.py"


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120
    )


def test_split_then_join_round_trips_with_small_pieces(tmp_path):
    big, small = tmp_path / "big-1.0-py3-none-any.whl", tmp_path / "small-1.0-py3-none-any.whl"
    big.write_bytes(os.urandom(int(2.5 * 2**20)))
    small.write_bytes(b"tiny wheel")
    pieces, out = tmp_path / "pieces", tmp_path / "joined"
    proc = _tool("split", str(big), str(small), "--out", str(pieces), "--piece-mib", "1")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((pieces / "manifest.json").read_text())
    assert [len(w["pieces"]) for w in manifest["wheels"]] == [3, 1]
    assert max(p.stat().st_size for p in pieces.glob("*.part*")) <= 2**20
    proc = _tool("join", str(pieces), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / big.name).read_bytes() == big.read_bytes()
    assert (out / small.name).read_bytes() == small.read_bytes()


def test_join_rejects_missing_or_corrupt_pieces(tmp_path):
    wheel = tmp_path / "w-1.0-py3-none-any.whl"
    wheel.write_bytes(os.urandom(3000))
    pieces = tmp_path / "pieces"
    assert _tool("split", str(wheel), "--out", str(pieces), "--piece-mib", "0.001").returncode == 0
    part = sorted(pieces.glob("*.part*"))[1]
    part.write_bytes(b"x" + part.read_bytes()[1:])
    proc = _tool("join", str(pieces), "--out", str(tmp_path / "j"))
    assert proc.returncode != 0 and "SHA-256 mismatch" in proc.stderr
    part.unlink()
    proc = _tool("join", str(pieces), "--out", str(tmp_path / "j"))
    assert proc.returncode != 0 and "missing piece" in proc.stderr


@pytest.mark.parametrize("size", ["60", "0"])
def test_piece_size_must_stay_below_60_mib(tmp_path, size):
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"abc")
    proc = _tool("split", str(wheel), "--out", str(tmp_path / "p"), "--piece-mib", size)
    assert proc.returncode != 0 and "--piece-mib" in proc.stderr
