"""Identities of evaluation sets, read as ``dist-cosface eval`` reads them, and their mean
embeddings (images split over ranks).

``--eval-set PATH``: a ``.bin``, a pairs file or a folder holding ``pairs.txt`` (verification
sets), or a folder of identity folders (``root/<identity>/<image>``: MegaFace/FaceScrub probe
sets, any image folder). ``--eval-ijb ROOT NAME``: an IJB-B/C release.

Verification sets name no identities, so they are recovered: two images of a "same" pair are
one identity, so are images in one folder (LFW's ``name/name_0001.jpg`` layout), and a
``.bin``'s byte-identical images are one image. IJB: the 1:N files' subject of each template
when present, else templates joined by their "same" pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_cosface.agreement import run_agreed
from dist_cosface.clean.unionfind import UnionFind
from dist_cosface.data.shards import MANIFEST_NAME
from dist_cosface.eval.embedding import embed_images, load_image
from dist_cosface.eval.ijb import read_ijb
from dist_cosface.eval.images import ImageRef, list_identity_folders
from dist_cosface.eval.ranks import gather_rows, rank_slice
from dist_cosface.eval.targets import load_target
from dist_cosface.eval.verification_set import VerificationSet
from dist_cosface.imageio import decode_image


@dataclass
class EvalIdentities:
    name: str  # the set's name (unique among the sets of one command)
    source: str
    identities: list[str]
    images: list[ImageRef | Path | bytes]
    owner: list[int]  # identity of each image


def load_eval_set(path: str | Path) -> EvalIdentities:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"eval set not found: {path}")
    if path.is_dir() and not (path / "pairs.txt").is_file():
        if (path / MANIFEST_NAME).is_file():
            raise ValueError(f"{path}: a shard set is no evaluation set (it names no identities)")
        refs, owner, names = list_identity_folders(path)
        return EvalIdentities(path.name, str(path), names, list(refs), owner)
    return _verification_identities(load_target(path))


def _verification_identities(vset: VerificationSet) -> EvalIdentities:
    keys: dict[str, int] = {}
    images: list[Path | bytes] = []
    node = []
    for item in vset.images:
        key = str(item.resolve()) if isinstance(item, Path) else hashlib.sha1(item).hexdigest()
        if key not in keys:
            keys[key] = len(images)
            images.append(item)
        node.append(keys[key])
    uf = UnionFind(len(images))
    for pair, same in enumerate(vset.issame):
        if same:
            uf.union(node[2 * pair], node[2 * pair + 1])
    folders: dict[Path, int] = {}
    for n, item in enumerate(images):
        if isinstance(item, Path):
            uf.union(folders.setdefault(item.parent, n), n)
    return _named_groups(vset.name, vset.source, images, uf)


def _named_groups(name: str, source: str, images: list, uf: UnionFind) -> EvalIdentities:
    roots: dict[int, int] = {}
    identities, owner = [], []
    for n, item in enumerate(images):
        root = uf.find(n)
        if root not in roots:
            roots[root] = len(identities)
            label = item.parent.name if isinstance(item, Path) else f"image{n}"
            identities.append(label)
        owner.append(roots[root])
    return EvalIdentities(name, source, identities, images, owner)


def load_ijb_identities(root: str | Path, name: str) -> EvalIdentities:
    ijb = read_ijb(root, name)
    templates = sorted({int(t) for t in ijb.templates})
    position = {t: n for n, t in enumerate(templates)}
    subjects: dict[int, int] = dict(ijb.probes)
    for table in ijb.galleries.values():
        subjects.update(table)
    uf = UnionFind(len(templates))
    by_subject: dict[int, int] = {}
    for t, s in sorted(subjects.items()):
        uf.union(by_subject.setdefault(s, position[t]), position[t])
    if not subjects:  # no 1:N files: the verification pairs say which templates are one person
        for (a, b), same in zip(ijb.pairs.tolist(), ijb.labels.tolist()):
            if same:
                uf.union(position[a], position[b])
    subject_of = {uf.find(position[t]): s for t, s in sorted(subjects.items(), reverse=True)}
    roots: dict[int, int] = {}
    identities, owner = [], []
    for t in ijb.templates.tolist():
        root = uf.find(position[int(t)])
        if root not in roots:
            roots[root] = len(identities)
            subject = subject_of.get(root)
            identities.append(f"subject{subject}" if subject is not None else f"template{t}")
        owner.append(roots[root])
    return EvalIdentities(name, str(root), identities, list(ijb.images), owner)


def _load(item, image_size: int):
    if isinstance(item, ImageRef):
        return load_image(item, image_size)
    if isinstance(item, Path):
        return decode_image(item.read_bytes(), str(item))
    return decode_image(item, "a .bin image")


def identity_means(
    backbone: nn.Module,
    sets: list[EvalIdentities],
    image_size: int,
    device: torch.device,
    batch_size: int,
    flip: bool,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Unit mean embedding ``[identities of all sets, D]`` of each identity (collective).

    Images that cannot be aligned (IJB landmarks) are left out of their identity's mean.
    """
    items = [item for s in sets for item in s.images]
    start, stop = rank_slice(len(items), group, batch_size)
    skipped: list[int] = []

    def embed() -> torch.Tensor:
        return embed_images(
            backbone,
            items[start:stop],
            image_size,
            device,
            batch_size,
            flip,
            skipped=skipped,
            load=lambda item: _load(item, image_size),
        )

    local = run_agreed(embed, group)
    embeddings = F.normalize(gather_rows(local, group).double(), dim=1)  # skipped: zero rows
    owner, base = [], 0
    for s in sets:
        owner.extend(base + o for o in s.owner)
        base += len(s.identities)
    sums = torch.zeros(base, embeddings.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.tensor(owner, dtype=torch.int64), embeddings)
    return F.normalize(sums, dim=1)
