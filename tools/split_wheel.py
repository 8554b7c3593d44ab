"""Carry wheels (e.g. DALI and its dependencies) to an offline machine in pieces < 60 MiB.

On a machine with network access:
    python -m pip download nvidia-dali-cuda120 -d dali_wheels     # DALI + its dependencies
    python tools/split_wheel.py split dali_wheels/*.whl --out dali_pieces
Copy ``dali_pieces/`` (and this script) to the offline machine, then:
    python tools/split_wheel.py install dali_pieces nvidia-dali-cuda120
which reassembles every wheel, checks its SHA-256 against ``manifest.json`` and runs
``pip install --no-index --find-links <reassembled wheels> nvidia-dali-cuda120``.
``join`` only reassembles (``python tools/split_wheel.py join dali_pieces --out wheels``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

MIB = 2**20
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def split(wheels: list[Path], out: Path, piece_bytes: int) -> dict:
    """Write ``<wheel>.partNNN`` pieces of at most ``piece_bytes`` and a manifest."""
    if piece_bytes < 1:
        raise ValueError(f"piece size must be positive, got {piece_bytes} bytes")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"piece_bytes": piece_bytes, "wheels": []}
    for wheel in wheels:
        if not wheel.is_file():
            raise ValueError(f"{wheel}: no such file")
        pieces = []
        with wheel.open("rb") as f:
            for index, block in enumerate(iter(lambda: f.read(piece_bytes), b"")):
                name = f"{wheel.name}.part{index:03d}"
                _atomic_write(out / name, block)
                pieces.append(name)
        entry = {"name": wheel.name, "sha256": _sha256(wheel), "pieces": pieces}
        manifest["wheels"].append(entry)
    _atomic_write(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def join(pieces_dir: Path, out: Path) -> list[Path]:
    """Reassemble every wheel of the manifest into ``out``; raise on a missing/bad piece."""
    manifest_path = pieces_dir / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: no manifest (was this folder made by 'split'?)")
    manifest = json.loads(manifest_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    wheels = []
    for entry in manifest["wheels"]:
        target = out / entry["name"]
        tmp = target.with_name(target.name + ".tmp")
        with tmp.open("wb") as f:
            for name in entry["pieces"]:
                piece = pieces_dir / name
                if not piece.is_file():
                    raise ValueError(f"{piece}: missing piece of {entry['name']}")
                f.write(piece.read_bytes())
        if _sha256(tmp) != entry["sha256"]:
            tmp.unlink()
            raise ValueError(f"{entry['name']}: SHA-256 mismatch after reassembly")
        os.replace(tmp, target)
        wheels.append(target)
    return wheels


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split", help="split wheels into pieces")
    sp.add_argument("wheels", nargs="+", type=Path)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--piece-mib", type=float, default=59.0, help="piece size (default 59)")
    jp = sub.add_parser("join", help="reassemble the wheels of a pieces folder")
    jp.add_argument("pieces", type=Path)
    jp.add_argument("--out", type=Path, required=True)
    ip = sub.add_parser("install", help="join into <pieces>/wheels, then pip install offline")
    ip.add_argument("pieces", type=Path)
    ip.add_argument("requirements", nargs="+", help="e.g. nvidia-dali-cuda120")
    args = p.parse_args(argv)
    if args.cmd == "split":
        if not 0 < args.piece_mib < 60:
            p.error("--piece-mib must be in (0, 60)")
        manifest = split(args.wheels, args.out, int(args.piece_mib * MIB))
        count = sum(len(w["pieces"]) for w in manifest["wheels"])
        print(f"{len(manifest['wheels'])} wheel(s) -> {count} piece(s) in {args.out}")
        return 0
    if args.cmd == "join":
        for wheel in join(args.pieces, args.out):
            print(wheel)
        return 0
    folder = args.pieces / "wheels"
    join(args.pieces, folder)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    print(" ".join(cmd + args.requirements), flush=True)
    return subprocess.call(cmd + args.requirements)


if __name__ == "__main__":
    sys.exit(main())
