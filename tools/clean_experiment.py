"""Planted-noise experiment of ``dist-cosface clean`` on real faces (ORL, Extended Yale B) and
generated ones, and the accuracy of models trained on the noisy vs the cleaned set.

For one dataset and seed:

1. the open-set split of docs/experiments.md (every 4th identity held out), then noise planted
   into the training part: ``--flip`` of the samples get a random other training label,
   ``--split`` of the training identities have half their images moved to a new label, and
   ``--copy`` held-out identities have half their images copied into training as new classes
   (the other half stays in the evaluation folders: the same people, other photos);
2. the noisy set written as shards (PNG, shuffled), the held-out identities as identity
   folders (the ``--eval-set`` of clean);
3. a teacher trained on the noisy shards by the engine (``dist_cosface.engine.train``,
   MobileFaceNet at 32 px), then ``clean`` twice in this process: once with every threshold
   open (every score listed, for precision / recall at any threshold) and once with the
   defaults (the cleaned set);
4. students (``dist_cosface.experiments``: SmallFaceNet + the project's head, the settings of
   ``configs/experiments/<data>.yaml``) trained on the noisy and on the cleaned set with the
   same number of optimizer steps, for each of ``--student-seeds``, verified on the held-out
   identities that were never copied into training.

One JSON line per (dataset, seed) goes to ``--out``; ``table`` prints the docs' tables.

Examples::

    python tools/clean_experiment.py run --dataset yaleb --out runs/clean/results.jsonl
    python tools/clean_experiment.py run --dataset synthetic --out runs/clean/results.jsonl
    python tools/clean_experiment.py table runs/clean/results.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from dist_cosface.clean.config import CleanConfig  # noqa: E402
from dist_cosface.clean.run import CleanJob, clean  # noqa: E402
from dist_cosface.cli import configure_logging  # noqa: E402
from dist_cosface.config import load_config  # noqa: E402
from dist_cosface.configtools import from_mapping, load_yaml  # noqa: E402
from dist_cosface.data.shards import (  # noqa: E402
    Manifest,
    ShardInfo,
    ShardWriter,
    publish_shard_set,
    read_index,
    shard_stem,
)
from dist_cosface.data.synth_shards import write_synthetic_image_folder  # noqa: E402
from dist_cosface.distributed import DistContext  # noqa: E402
from dist_cosface.engine import train  # noqa: E402
from dist_cosface.experiments import (  # noqa: E402
    ExperimentConfig,
    FaceSet,
    identity_split,
    load_faces,
    train_model,
)
from dist_cosface.experiments.runner import embed, verify  # noqa: E402

SIZE = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--dataset", choices=["orl", "yaleb", "synthetic"], default="yaleb")
    run.add_argument("--data-root", default=str(REPO / "../shared/data"))
    run.add_argument("--seed", type=int, default=0, help="noise planting and teacher seed")
    run.add_argument("--flip", type=float, default=0.1, help="share of samples relabelled")
    run.add_argument("--split", type=float, default=0.1, help="share of identities split")
    run.add_argument("--copy", type=int, default=3, help="held-out identities copied in")
    run.add_argument(
        "--teacher-epochs", type=int, default=None, help="default: 30 on ORL, 10 otherwise"
    )
    run.add_argument("--student-seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--synthetic-identities", type=int, default=128)
    run.add_argument("--synthetic-images", type=int, default=16)
    run.add_argument("--max-angle", type=float, help="clean's threshold (default: its own)")
    run.add_argument("--duplicate-cos", type=float, help="clean's threshold (default: its own)")
    run.add_argument("--overlap-cos", type=float, help="clean's threshold (default: its own)")
    run.add_argument(
        "--reuse-teacher",
        action="store_true",
        help="keep the teacher of an earlier run with the same dataset and seed",
    )
    run.add_argument("--work", default="runs/clean_experiment", help="scratch folder")
    run.add_argument("--out", help="append one JSON line to this file")
    table = sub.add_parser("table")
    table.add_argument("results", nargs="+")
    return p.parse_args(argv)


# ---- data and planted noise ------------------------------------------------------------------


def load_dataset(args, work: Path):

    if args.dataset != "synthetic":
        return load_faces(Path(args.data_root) / args.dataset, SIZE)

    folder = work / "synthetic_faces"
    if not folder.is_dir():
        write_synthetic_image_folder(
            folder, args.synthetic_identities, args.synthetic_images, image_size=SIZE, seed=1
        )
    return load_faces(folder, SIZE)


def plant(args, faces):
    """The noisy training samples and the evaluation identities, with the truth of each."""

    rng = np.random.default_rng(args.seed)
    train_ids, held_ids = identity_split(faces.identities, "test")
    index = {name: faces.identities.index(name) for name in faces.identities}
    labels = faces.labels.numpy()
    samples = []  # (image row, label, person, kind)
    names = list(train_ids)
    for c, name in enumerate(train_ids):
        samples += [(int(i), c, name, "clean") for i in np.flatnonzero(labels == index[name])]
    n_split = max(2, round(args.split * len(train_ids)))
    splits = []
    for name in sorted(rng.choice(train_ids, n_split, replace=False).tolist()):
        c, new = train_ids.index(name), len(names)
        names.append(f"{name}~split")
        mine = [n for n, s in enumerate(samples) if s[1] == c]
        for n in rng.choice(mine, len(mine) // 2, replace=False).tolist():
            samples[n] = (samples[n][0], new, name, "split")
        splits.append((c, new))
    copied = sorted(rng.choice(held_ids, args.copy, replace=False).tolist())
    eval_rows: dict[str, list[int]] = {}
    copy_class = {}
    for name in held_ids:
        rows = np.flatnonzero(labels == index[name])
        if name in copied:
            rng.shuffle(rows)
            copy_class[name] = len(names)
            names.append(f"copy~{name}")
            samples += [(int(i), copy_class[name], name, "copy") for i in rows[: len(rows) // 2]]
            rows = np.sort(rows[len(rows) // 2 :])
        eval_rows[name] = rows.tolist()
    flippable = [n for n, s in enumerate(samples) if s[3] == "clean"]
    n_flip = round(args.flip * len(samples))
    for n in rng.choice(flippable, n_flip, replace=False).tolist():
        row, c, person, _ = samples[n]
        siblings = {c} | {b for a, b in splits if a == c} | {a for a, b in splits if b == c}
        others = [k for k in range(len(train_ids)) if k not in siblings]
        samples[n] = (row, int(rng.choice(others)), person, "flip")
    return {
        "samples": samples,
        "names": names,
        "splits": splits,
        "copied": copied,
        "copy_class": copy_class,
        "eval_rows": eval_rows,
        "images": faces.images,
    }


def _png(pixels) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels[0].numpy()).save(buf, "PNG")
    return buf.getvalue()


def write_sets(planted: dict, work: Path, seed: int) -> tuple[Path, Path]:
    """The noisy shards (shuffled) and the held-out identity folders."""

    shards, evals = work / "noisy_shards", work / "eval"
    samples, images = planted["samples"], planted["images"]
    order = np.random.default_rng(seed + 1).permutation(len(samples))
    shards.mkdir(parents=True)
    infos = []
    for start in range(0, len(order), 256):
        writer = ShardWriter(shards / f"{shard_stem(len(infos))}.tar")
        for n in order[start : start + 256].tolist():
            row, label = samples[n][:2]
            writer.write(f"{n:06d}", {"png": _png(images[row]), "cls": str(label).encode()})
        infos.append(ShardInfo(writer.tar_path.name, writer.num_samples, writer.close()))
    names = {name: c for c, name in enumerate(planted["names"])}
    manifest = Manifest(len(names), len(samples), infos, "png", source="clean_experiment")
    publish_shard_set(shards, manifest, names)
    for name, rows in planted["eval_rows"].items():
        (evals / name).mkdir(parents=True)
        for row in rows:
            (evals / name / f"{row}.png").write_bytes(_png(images[row]))
    return shards, evals


# ---- teacher and cleaning --------------------------------------------------------------------


def train_teacher(shards: Path, num_classes: int, num_samples: int, run: Path, args) -> dict:

    batch = 64
    epochs = args.teacher_epochs or (30 if args.dataset == "orl" else 10)
    steps = math.ceil(epochs * num_samples / batch)
    cfg = load_config(
        None,
        [
            "model.name=mobilefacenet",
            "model.embedding_size=128",
            f"model.input_size={SIZE}",
            f"classifier.num_classes={num_classes}",
            "classifier.margin_type=cosface",
            "classifier.scale=30.0",
            "classifier.margin=0.35",
            "data.backend=webdataset",
            f"data.path={shards}",
            f"data.batch_size={batch}",
            f"data.image_size={SIZE}",
            "data.num_workers=0",
            "data.shuffle_buffer=512",
            f"data.seed={args.seed}",
            "optim.name=sgd",
            "optim.lr=0.1",
            "optim.momentum=0.9",
            "optim.weight_decay=5e-4",
            "optim.schedule=cosine",
            "optim.warmup_steps=10",
            f"train.total_steps={steps}",
            f"train.seed={args.seed}",
            "train.log_every=50",
            f"checkpoint.every_steps={steps}",
            "checkpoint.async_save=false",
            "metrics.enabled=false",
            f"train.output_dir={run}",
        ],
    )
    started = time.perf_counter()
    summary = train(cfg, DistContext())
    return {"steps": steps, "seconds": time.perf_counter() - started, "loss": summary.loss}


def run_clean(run: Path, shards: Path, evals: Path, out: Path, thresholds: dict | None) -> dict:
    """``clean`` in this process with ``thresholds``; None: every threshold open."""

    settings = {"backend": "webdataset", "num_workers": 0, **(thresholds or {})}
    if thresholds is None:  # list every score: precision / recall at any threshold afterwards
        settings.update(
            max_angle=0.0,
            duplicate_cos=-1.0,
            overlap_cos=-1.0,
            drop_noisy=False,
            merge_duplicates=False,
            remove_overlap=False,
        )
    started = time.perf_counter()
    summary = clean(
        CleanJob(str(run), str(shards), str(out), [str(evals)]),
        CleanConfig(**settings),
        DistContext(),
    )
    return {"seconds": time.perf_counter() - started, "counts": summary["counts"]}


def _rows(out: Path, name: str) -> list[dict]:
    return json.loads((out / "clean_report" / f"{name}.json").read_text())["rows"]


def _pr(found: set, truth: set) -> dict:
    hit = len(found & truth)
    return {
        "found": len(found),
        "true": len(truth),
        "precision": hit / len(found) if found else None,
        "recall": hit / len(truth) if truth else None,
    }


def scores_vs_truth(planted: dict, analysis: Path) -> dict:
    """Every score from the open run, labelled with the planted truth."""
    kinds = {f"{n:06d}": s[3] for n, s in enumerate(planted["samples"])}
    angles = [(r["angle_deg"], kinds[r["key"]] == "flip") for r in _rows(analysis, "noisy_samples")]
    split = {tuple(sorted(p)) for p in planted["splits"]}
    pairs = [
        (r["cos"], (r["class_a"], r["class_b"]) in split)
        for r in _rows(analysis, "duplicate_pairs")
    ]
    copy_class = planted["copy_class"]
    overlap = [
        (r["cos"], copy_class.get(r["identity"]) == r["class"]) for r in _rows(analysis, "overlap")
    ]
    return {"angles": angles, "pairs": pairs, "overlap": overlap}


def precision_recall(scored: list[tuple[float, bool]], threshold: float, above=True) -> dict:
    found = {n for n, (v, _) in enumerate(scored) if (v > threshold if above else v < threshold)}
    truth = {n for n, (_, t) in enumerate(scored) if t}
    return _pr(found, truth)


def sweep(scored, thresholds) -> dict:
    return {f"{t:g}": precision_recall(scored, t) for t in thresholds}


# ---- students --------------------------------------------------------------------------------


def student_sets(planted: dict, cleaned: Path):
    """(noisy FaceSet, cleaned FaceSet, evaluation FaceSet of never-copied identities)."""
    images, samples = planted["images"], planted["samples"]
    noisy = FaceSet(
        images[[s[0] for s in samples]], torch.tensor([s[1] for s in samples]), planted["names"]
    )
    manifest = Manifest.from_json((cleaned / "manifest.json").read_text(), "manifest")
    rows, labels = [], []
    for shard in manifest.shards:
        data = (cleaned / shard.name).read_bytes()
        for entry in read_index(cleaned / shard.index_name):
            offset, size = entry.components["cls"]
            rows.append(samples[int(entry.key)][0])
            labels.append(int(data[offset : offset + size]))
    clean_set = FaceSet(
        images[rows], torch.tensor(labels), [str(c) for c in range(manifest.num_classes)]
    )
    kept = [n for n in planted["eval_rows"] if n not in planted["copied"]]
    eval_rows = [r for n in kept for r in planted["eval_rows"][n]]
    eval_labels = [k for k, n in enumerate(kept) for _ in planted["eval_rows"][n]]
    return noisy, clean_set, FaceSet(images[eval_rows], torch.tensor(eval_labels), kept)


def train_students(args, noisy, cleaned, held) -> list[dict]:

    dataset = "yaleb" if args.dataset == "synthetic" else args.dataset
    base = from_mapping(ExperimentConfig, load_yaml(REPO / f"configs/experiments/{dataset}.yaml"))
    steps = base.epochs * max(len(noisy.labels) // base.batch_size, 1)
    out = []
    for seed in args.student_seeds:
        for name, data in (("noisy", noisy), ("cleaned", cleaned)):
            per_epoch = max(len(data.labels) // base.batch_size, 1)
            cfg = dataclasses.replace(base, seed=seed, epochs=max(1, round(steps / per_epoch)))
            torch.set_num_threads(1)
            started = time.perf_counter()
            model, _, summary = train_model(cfg, data)
            result = verify(embed(model, held.images), held.labels, cfg.max_pairs)
            out.append(
                {
                    "set": name,
                    "seed": seed,
                    "steps": summary["steps"],
                    "seconds": time.perf_counter() - started,
                    **result,
                }
            )
    return out


# ---- the whole run and the tables ------------------------------------------------------------


def run(args, argv: list[str]) -> dict:

    work = Path(args.work) / f"{args.dataset}_seed{args.seed}"
    reuse = args.reuse_teacher and (work / "run" / "checkpoints").is_dir()
    for child in work.iterdir() if work.is_dir() else ():
        if reuse and child.name in ("run", "teacher.json"):
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    faces = load_dataset(args, Path(args.work))
    planted = plant(args, faces)  # the same for the same seed: a kept teacher still fits
    shards, evals = write_sets(planted, work, args.seed)
    n_classes, n_samples = len(planted["names"]), len(planted["samples"])
    teacher = (
        json.loads((work / "teacher.json").read_text())
        if reuse
        else train_teacher(shards, n_classes, n_samples, work / "run", args)
    )
    (work / "teacher.json").write_text(json.dumps(teacher))
    d = CleanConfig()
    used = {
        k: getattr(args, k) if getattr(args, k) is not None else getattr(d, k)
        for k in ("max_angle", "duplicate_cos", "overlap_cos")
    }
    run_clean(work / "run", shards, evals, work / "analysis", None)
    cleaned = run_clean(work / "run", shards, evals, work / "cleaned", used)
    scored = scores_vs_truth(planted, work / "analysis")
    findings = {
        "noisy_samples": precision_recall(scored["angles"], used["max_angle"]),
        "duplicate_pairs": precision_recall(scored["pairs"], used["duplicate_cos"]),
        "overlap": precision_recall(scored["overlap"], used["overlap_cos"]),
    }
    curves = {
        "noisy_samples": sweep(scored["angles"], [30, 40, 50, 60, 70, 75, 80, 90]),
        "duplicate_pairs": sweep(scored["pairs"], [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
        "overlap": sweep(scored["overlap"], [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
    }
    students = train_students(args, *student_sets(planted, work / "cleaned"))
    return {
        "dataset": args.dataset,
        "seed": args.seed,
        "command": "python tools/clean_experiment.py " + shlex.join(argv),
        "load_average": load,
        "planted": {
            "samples": len(planted["samples"]),
            "classes": len(planted["names"]),
            "flipped": sum(s[3] == "flip" for s in planted["samples"]),
            "split_identities": len(planted["splits"]),
            "copied_identities": len(planted["copied"]),
        },
        "teacher": teacher,
        "clean_seconds": cleaned["seconds"],
        "cleaned_counts": cleaned["counts"],
        "thresholds": used,
        "findings": findings,
        "curves": curves,
        "students": students,
    }


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def _mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=float) * 100
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def table(paths: list[str]) -> str:
    lines = [json.loads(x) for p in paths for x in Path(p).read_text().splitlines() if x.strip()]
    out = [
        "| data | planted: flipped / split ids / copied ids | thresholds: angle / dup / "
        "overlap | noisy samples P / R % | duplicates P / R % | overlap P / R % | "
        "teacher steps / s | clean s | load |",
        "|" + "---|" * 9,
    ]
    for r in lines:
        f, p = r["findings"], r["planted"]
        cells = [
            f"{_pct(f[k]['precision'])} / {_pct(f[k]['recall'])}"
            for k in ("noisy_samples", "duplicate_pairs", "overlap")
        ]
        out.append(
            f"| {r['dataset']} (seed {r['seed']}) | {p['flipped']} of {p['samples']} / "
            f"{p['split_identities']} / {p['copied_identities']} | {_thresholds(r)} | "
            + " | ".join(cells)
            + f" | {r['teacher']['steps']} / {r['teacher']['seconds']:.0f} | "
            f"{r['clean_seconds']:.1f} | {r['load_average']:.1f} |"
        )
    out += [
        "",
        "| data | trained on | samples / classes | steps | seeds | 10-fold acc % | "
        "TAR@FAR=1e-2 % | AUC % |",
        "|" + "---|" * 8,
    ]
    shown = set()
    for r in lines:
        for name in ("noisy", "cleaned"):
            if name == "noisy" and (r["dataset"], r["seed"]) in shown:
                continue  # the same noisy students as the dataset's first line
            shown.add((r["dataset"], r["seed"]))
            rows = [s for s in r["students"] if s["set"] == name]
            tars = [s["tar_at_far_0.01"] for s in rows if s["tar_at_far_0.01"] is not None]
            counts = r["cleaned_counts"]
            size = (
                f"{r['planted']['samples']} / {r['planted']['classes']}"
                if name == "noisy"
                else f"{counts['kept_samples']} / {counts['kept_classes']}"
            )
            label = name if name == "noisy" else f"cleaned at {_thresholds(r)}"
            out.append(
                f"| {r['dataset']} | {label} | {size} | {rows[0]['steps']} | {len(rows)} | "
                f"{_mean_std([s['accuracy'] for s in rows])} | "
                f"{_mean_std(tars) if tars else 'n/a'} | "
                f"{_mean_std([s['roc_auc'] for s in rows])} |"
            )
    out += [
        "",
        "Precision / recall % at other thresholds (from the run with every score listed):",
        "",
        "| data | finding | threshold: P / R |",
        "|---|---|---|",
    ]
    curves = {(r["dataset"], r["seed"]): r["curves"] for r in lines}  # one teacher each
    for (dataset, _), found in curves.items():
        for finding, curve in found.items():
            cells = ", ".join(
                f"{t}: {_pct(v['precision'])} / {_pct(v['recall'])}" for t, v in curve.items()
            )
            out.append(f"| {dataset} | {finding} | {cells} |")
    return "\n".join(out)


def _thresholds(line: dict) -> str:
    t = line["thresholds"]
    return f"{t['max_angle']:g}° / {t['duplicate_cos']:g} / {t['overlap_cos']:g}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    configure_logging()  # the teachers' progress lines, as `dist-cosface train` shows them
    if args.cmd == "table":
        print(table(args.results))
        return
    torch.set_num_threads(1)
    line = run(args, argv)
    print(json.dumps(line), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
