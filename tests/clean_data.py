"""A small planted cleaning case (shards, eval folders, checkpoints) and a brute-force numpy
reference of every finding of ``dist-cosface clean``, shared by tests/test_clean*.py.

Images are generated faces (``data.synthetic``'s renderer) saved as PNG (lossless: the clean
command and the reference decode the same pixels). Centers are planted from the embeddings
of an untrained MobileFaceNet, so the case is cheap and every kind of finding occurs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from dist_cosface.data.shards import Manifest, ShardInfo, ShardWriter, publish_shard_set, shard_stem

NUM_CLASSES = 7  # classes 0..5 are people 0..5; class 6 is person 2 again (a duplicate)
PER_CLASS = 8
PEOPLE_IN_EVAL = {"alice": 4, "bob": 7}  # alice trained on (class 4), bob never
FLIPS = {3: 0, 17: 5, 30: 1, 45: 2}  # sample -> person actually shown
SIZE = 32


def _render(people: list[int], seed: int) -> list[bytes]:
    from PIL import Image

    from dist_cosface.data.config import DataConfig
    from dist_cosface.data.synthetic import SyntheticLoader
    from dist_cosface.distributed import DistContext

    cfg = DataConfig(image_size=SIZE, seed=11, random_flip=False, synthetic_num_classes=8)
    faces = SyntheticLoader(cfg, DistContext())
    gen = torch.Generator().manual_seed(seed)
    images = faces.make_batch(torch.tensor(people), gen).add(1).mul(127.5).round().clamp(0, 255)
    out = []
    for pixels in images.to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def write_case(root: Path) -> dict:
    """Shards (4 flipped labels, one duplicated identity) and an identity-folder eval set."""
    labels = [c for c in range(NUM_CLASSES) for _ in range(PER_CLASS)]
    people = [FLIPS.get(i, c if c < 6 else 2) for i, c in enumerate(labels)]
    images = _render(people, seed=1)
    order = np.random.default_rng(0).permutation(len(labels))  # shuffled, as converted sets are
    shards_dir = root / "shards"
    shards_dir.mkdir(parents=True)
    infos = []
    for start in range(0, len(order), 10):
        writer = ShardWriter(shards_dir / f"{shard_stem(len(infos))}.tar")
        for i in order[start : start + 10]:
            writer.write(f"s{i:04d}", {"png": images[i], "cls": str(labels[i]).encode()})
        infos.append(ShardInfo(writer.tar_path.name, writer.num_samples, writer.close()))
    names = {f"person{c}": c for c in range(NUM_CLASSES)}
    publish_shard_set(shards_dir, Manifest(NUM_CLASSES, len(labels), infos, "png"), names)
    eval_dir = root / "eval"
    for name, person in PEOPLE_IN_EVAL.items():
        (eval_dir / name).mkdir(parents=True)
        for n, png in enumerate(_render([person] * 5, seed=2 + person)):
            (eval_dir / name / f"{n}.png").write_bytes(png)
    return {"shards": shards_dir, "eval": eval_dir}


def read_samples(shards: Path) -> tuple[list[str], np.ndarray, list[bytes]]:
    """(keys, labels, image bytes) in the set's global order (manifest, then index order)."""
    from dist_cosface.data.shards import read_index

    manifest = Manifest.from_json((shards / "manifest.json").read_text(), "manifest")
    keys, labels, images = [], [], []
    for shard in manifest.shards:
        data = (shards / shard.name).read_bytes()
        for entry in read_index(shards / shard.index_name):
            parts = {ext: data[o : o + n] for ext, (o, n) in entry.components.items()}
            keys.append(entry.key)
            labels.append(int(parts.pop("cls")))
            images.append(next(iter(parts.values())))
    return keys, np.asarray(labels), images


def backbone():
    """The untrained MobileFaceNet the checkpoints hold (32 px, 16-d), seeded."""
    from dist_cosface.models import build_backbone
    from dist_cosface.models.config import ModelConfig

    torch.manual_seed(5)
    return build_backbone(ModelConfig("mobilefacenet", 16, SIZE)).eval()


def embed_reference(model: torch.nn.Module, images: list) -> np.ndarray:
    """Unit float64 embeddings through a float64 copy of the backbone (eval mode)."""
    import copy

    from dist_cosface.imageio import decode_resized, to_unit_range

    raw = [data.read_bytes() if isinstance(data, Path) else data for data in images]
    x = torch.stack([to_unit_range(decode_resized(r, SIZE)) for r in raw]).double()
    with torch.no_grad():
        e = copy.deepcopy(model).double().eval()(x).numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


class _Tree:
    """What a checkpoint must hold for clean: the backbone and the classifier rows."""

    native = None

    def __init__(self, model: torch.nn.Module, rows: np.ndarray, k: int):
        # the head's layout: [C, D], or [C, K, D] with sub-centers (classifier/state.py)
        rows = torch.from_numpy(rows).float()
        self.model, self.rows = model, rows.view(-1, k, rows.shape[1]) if k > 1 else rows

    def snapshot(self) -> dict:
        return {"backbone": {"model": self.model.state_dict()}, "classifier": {"weight": self.rows}}


def write_checkpoint(run: Path, model: torch.nn.Module, rows: np.ndarray, k: int) -> Path:
    """A run folder whose one checkpoint holds ``model`` and ``rows`` ([C * K, D], class c's
    sub-centers in rows c * K .. c * K + K - 1), saved as the trainer saves them."""
    from dist_cosface.distributed import DistContext
    from dist_cosface.engine.checkpoint import Checkpointer
    from dist_cosface.engine.config import CheckpointConfig

    meta = {
        "epoch": 0,
        "engine": "ddp",
        "model": {
            "name": "mobilefacenet",
            "embedding_size": 16,
            "input_size": SIZE,
            "dropout": 0.0,
        },
        "image_size": SIZE,
        "num_classes": len(rows) // k,
    }
    if k > 1:
        meta["num_subcenters"] = k
    settings = CheckpointConfig(keep_last=1, async_save=False)
    checkpointer = Checkpointer(settings, run / "checkpoints", DistContext())
    checkpointer.save(1, _Tree(model, rows, k), meta)
    return run / "checkpoints" / "step_1"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def plant_rows(emb: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Class means as centers (class 6 copied from class 2 with a little noise); with k = 2
    class 1 gets two sub-centers on the two halves of its samples, the others a random one."""
    rng = np.random.default_rng(4)
    means = _unit(np.stack([emb[labels == c].mean(0) for c in range(NUM_CLASSES)]))
    means[6] = _unit(means[2] + 0.02 * rng.standard_normal(means.shape[1]))
    if k == 1:
        return means
    rows = np.stack([means, _unit(rng.standard_normal(means.shape))], axis=1)  # [C, 2, D]
    members = np.flatnonzero(labels == 1)
    rows[1, 0] = _unit(emb[members[: len(members) // 2]].mean(0))
    rows[1, 1] = _unit(emb[members[len(members) // 2 :]].mean(0))
    return rows.reshape(-1, means.shape[1])


def threshold_in_gap(values: np.ndarray, lo: float, hi: float = np.inf) -> float:
    """The middle of the widest gap between the sorted ``values`` in ``[lo, hi]``."""
    v = np.sort(values[(values >= lo) & (values <= hi)])
    i = int(np.argmax(np.diff(v)))
    assert v[i + 1] - v[i] > 1e-3, "no clear gap to put a threshold in"
    return float((v[i] + v[i + 1]) / 2)


def reference(emb, labels, rows, k, eval_means, t) -> dict:
    """Every finding of ``clean`` by brute force: full score matrices, BFS for merge sets."""
    c = NUM_CLASSES
    sub = rows.reshape(c, k, -1)
    cos = np.einsum("nd,nkd->nk", emb, sub[labels])
    votes = np.zeros((c, k), dtype=int)
    np.add.at(votes, (labels, cos.argmax(1)), 1)
    dominant = votes.argmax(1)
    share = votes.max(1) / votes.sum(1)
    score = cos[np.arange(len(labels)), dominant[labels]]
    angle = np.degrees(np.arccos(np.clip(score, -1, 1)))
    centers = sub[np.arange(c), dominant]
    full = centers @ centers.T
    pairs = {(a, b) for a in range(c) for b in range(a + 1, c) if full[a, b] > t["duplicate_cos"]}
    sets, seen = [], set()
    for start in range(c):  # breadth-first components of the pair graph
        if start in seen or not any(start in p for p in pairs):
            continue
        todo, comp = [start], set()
        while todo:
            x = todo.pop()
            if x not in comp:
                comp.add(x)
                todo += [b for a, b in pairs if a == x] + [a for a, b in pairs if b == x]
        seen |= comp
        sets.append(sorted(comp))
    overlap = {(i, j) for i, j in zip(*np.nonzero(eval_means @ centers.T > t["overlap_cos"]))}
    return {
        "score": score,
        "angle": angle,
        "noisy": set(np.flatnonzero(angle > t["max_angle"]).tolist()),
        "share": share,
        "low_share": set(np.flatnonzero(share < t["min_dominant_share"]).tolist()),
        "dominant": dominant,
        "centers": centers,
        "center_cos": full,
        "pairs": pairs,
        "merge_sets": sets,
        "overlap": {(int(i), int(j)) for i, j in overlap},
    }


def expected_output(ref: dict, labels: np.ndarray, keys: list[str]) -> dict[str, int]:
    """key -> new label of every sample the cleaned set must hold (defaults: drop noisy, merge,
    remove overlap), from the reference alone."""
    rep = np.arange(NUM_CLASSES)
    for group in ref["merge_sets"]:
        rep[group] = group[0]
    hit = {j for _, j in ref["overlap"]}
    removed = {c for c in range(NUM_CLASSES) if rep[c] in {rep[h] for h in hit}}
    kept = [i for i in range(len(labels)) if i not in ref["noisy"] and labels[i] not in removed]
    reps = sorted({int(rep[labels[i]]) for i in kept})
    return {keys[i]: reps.index(int(rep[labels[i]])) for i in kept}


def read_report(out: Path, name: str) -> list[dict]:
    return json.loads((out / "clean_report" / f"{name}.json").read_text())["rows"]
