"""Build a balanced verification .bin from an image folder (``<root>/<identity>/<images>``).

Example (identities held out of training, one name per line in held_out.txt):

    python tools/make_pairs.py data/faces runs/held_out.bin --num-pairs 3000 --seed 0 \
        --identities-file held_out.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_cosface.eval import load_bin, make_verification_set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image_folder", help="folder with one sub-folder of images per identity")
    parser.add_argument("out", help="path of the .bin to write")
    parser.add_argument("--num-pairs", type=int, default=6000, help="half same, half different")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identities-file", help="only these identities (one name per line)")
    return parser.parse_args(argv)


def read_identities(path: str | None) -> list[str] | None:
    if path is None:
        return None
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no identity names")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    identities = read_identities(args.identities_file)
    path = make_verification_set(
        args.image_folder, args.out, args.num_pairs, args.seed, identities=identities
    )
    vset = load_bin(path)
    print(f"wrote {path}: {vset.num_pairs} pairs ({sum(vset.issame)} same)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
