"""Converters: image folder or insightface RecordIO -> shuffled WebDataset shards.

The source is scanned once into a list of samples (class ids: identity folder names sorted,
or the RecordIO labels as they are), shuffled globally with ``seed`` (face datasets are stored
sorted by identity), cut into shards and written by parallel worker processes. Each shard is
written under a temporary name with its DALI index and renamed when complete; a
``<shard>.done.json`` marker published last lets a rerun skip finished shards.

Nothing outside the output's own files is ever deleted or read past a limit: the output folder
may not overlap the source, ``--overwrite`` clears only a folder that holds nothing but this
converter's files, and source images are read only when they are regular files (symlinks
resolved, wherever they point), at most ``max_image_bytes`` each.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from dist_cosface.align import align_encoded, read_landmarks_file
from dist_cosface.cliargs import UsageError
from dist_cosface.configtools import check_minimums
from dist_cosface.data import recordio
from dist_cosface.data.shards import (
    Manifest,
    ShardInfo,
    ShardWriter,
    atomic_write_text,
    publish_shard_set,
    shard_stem,
)
from dist_cosface.imageio import (
    PIL_FORMAT_EXTENSION,
    PNM_MODE_EXTENSION,
    is_image_file,
    keep_mode,
)

PLAN_NAME = "_plan.json"
# Every name this converter writes in an output folder (``.tmp``: written, not yet renamed).
OUTPUT_FILE = re.compile(
    r"(shard-\d{6,}\.(tar|idx|done\.json)|manifest\.json|labels\.json|_plan\.json)(\.tmp)?"
)
MAX_IMAGE_BYTES = 64 << 20  # default read cap per source image (faces are far smaller)


@dataclass
class ConvertOptions:
    shard_size: int = 10_000  # samples per shard
    max_shard_bytes: int = 0  # also cut when a shard's source bytes would exceed this (0: off)
    image_format: Literal["keep", "jpeg"] = "keep"  # keep the encoded bytes or re-encode
    jpeg_quality: int = 95
    seed: int = 0
    workers: int = 1
    on_bad: Literal["skip", "stop"] = "skip"
    overwrite: bool = False  # start clean instead of resuming
    num_classes: int = 0  # RecordIO only: labels must be < this (0: max label + 1)
    progress: bool | None = None  # None: only when stderr is a terminal
    landmarks: str = ""  # folder only: file of "relative/path x1 y1 ... x5 y5"; aligns images
    align_size: int = 112  # side of the aligned crops (the 112 template, scaled)
    max_image_bytes: int = MAX_IMAGE_BYTES  # larger source images (or records) are bad inputs

    def __post_init__(self) -> None:
        minimums = {
            "shard_size": 1,
            "max_shard_bytes": 0,
            "workers": 1,
            "align_size": 8,
            "max_image_bytes": 1,
        }
        check_minimums(self, minimums)
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.image_format not in ("keep", "jpeg") or self.on_bad not in ("skip", "stop"):
            raise ValueError(f"bad image_format/on_bad: {self.image_format}/{self.on_bad}")


@dataclass
class Problems:
    """Bad inputs met on the way: counted per kind, with the first few named in the summary."""

    on_bad: str = "skip"
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def report(self, kind: str, where: str, detail: str = "", stop: bool = True) -> None:
        message = f"{where}: {kind}" + (f" ({detail})" if detail else "")
        if stop and self.on_bad == "stop":
            raise ValueError(message)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(message)

    def merge(self, other: Problems) -> None:
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        self.examples.extend(other.examples[: max(0, 20 - len(self.examples))])


class BadFile(ValueError):
    """A source file that is not read: ``kind`` is the problem, ``detail`` says why."""

    def __init__(self, path: str, kind: str, detail: str):
        super().__init__(f"{path}: {kind} ({detail})")
        self.kind, self.detail = kind, detail


_FILE_TYPES = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def check_regular(path: str, st: os.stat_result, max_bytes: int) -> None:
    """BadFile unless ``st`` (of ``path``, links resolved) is a regular file of <= max_bytes."""
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_TYPES.get(stat.S_IFMT(st.st_mode), "a special file")
        raise BadFile(path, "not a regular file", kind)
    if st.st_size > max_bytes:
        raise BadFile(path, "file too large", f"{st.st_size} bytes, --max-image-bytes {max_bytes}")


def stat_source_file(path: str, max_bytes: int) -> int:
    """Size of a readable source image; BadFile for dangling links, special or huge files."""
    try:
        st = os.stat(path)  # follows symlinks: the target is what would be read
    except OSError as exc:
        raise BadFile(path, "unreadable file", exc.strerror or type(exc).__name__) from exc
    check_regular(path, st, max_bytes)
    return st.st_size


def read_source_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file, at most ``max_bytes``; BadFile otherwise.

    Checked again on the open descriptor (the file may have changed since the scan): opened
    non-blocking, so a FIFO put in its place cannot block, and never read unless regular.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BadFile(path, "unreadable file", exc.strerror or type(exc).__name__) from exc
    with open(fd, "rb", closefd=True) as f:
        check_regular(path, os.fstat(fd), max_bytes)
        data = f.read(max_bytes + 1)  # the file may have grown since the fstat
    if len(data) > max_bytes:
        raise BadFile(path, "file too large", f"over --max-image-bytes {max_bytes}")
    return data


@dataclass
class SourceSample:
    ref: str  # file path (folder) or record id (RecordIO)
    label: int
    size: int  # encoded bytes in the source, for byte-limited shards


@dataclass
class ShardJob:
    index: int
    out_dir: str
    kind: str  # "folder" or "recordio"
    rec_path: str
    rec_offsets: dict[int, int]
    samples: list[tuple[int, SourceSample]]  # (global position, sample)
    options: ConvertOptions
    landmarks: dict[str, tuple[float, ...] | None] | None = None  # sample ref -> 5 points


@dataclass
class ConvertResult:
    manifest: Manifest
    written: int
    reused: int
    problems: Problems

    def summary(self) -> str:
        m = self.manifest
        lines = [
            f"{m.num_samples} samples, {m.num_classes} classes, {len(m.shards)} shards "
            f"({self.written} written, {self.reused} reused)",
        ]
        if self.problems.counts:
            lines.append(
                "skipped: " + ", ".join(f"{k}={v}" for k, v in self.problems.counts.items())
            )
            lines.extend("  " + e for e in self.problems.examples)
        return "\n".join(lines)


def scan_folder(
    src: Path, problems: Problems, max_bytes: int = MAX_IMAGE_BYTES
) -> tuple[list[SourceSample], dict[str, int]]:
    """``src/<identity>/<image>`` -> samples; class ids follow sorted identity names.

    An image is a regular file after resolving symlinks (a link may point anywhere, the
    user's own files); FIFOs, sockets, devices, dangling links and files over ``max_bytes``
    are bad inputs, found by ``stat`` without opening them.
    """
    per_identity: dict[str, list[tuple[Path, int]]] = {}
    for entry in sorted(src.iterdir()):
        if not entry.is_dir():  # README, LICENSE, ...: not part of the identity tree
            problems.report("ignored top-level file", str(entry), stop=False)
            continue
        images = []
        for path in sorted(entry.rglob("*")):
            if path.is_dir():  # rglob walks real sub-folders; linked ones are not descended
                continue
            if not is_image_file(path):
                problems.report("non-image file", str(path))
                continue
            try:
                images.append((path, stat_source_file(str(path), max_bytes)))
            except BadFile as exc:
                problems.report(exc.kind, str(path), exc.detail)
        if images:
            per_identity[entry.name] = images
        else:
            problems.report("empty identity folder", str(entry))
    if not per_identity:
        raise ValueError(f"{src}: no identity folders with images")
    label_map = {name: i for i, name in enumerate(sorted(per_identity))}
    samples = [
        SourceSample(str(p), label_map[name], size)
        for name, paths in per_identity.items()
        for p, size in paths
    ]
    return samples, label_map


def scan_recordio(
    rec: Path, num_classes: int, problems: Problems, max_bytes: int = MAX_IMAGE_BYTES
) -> tuple[list[SourceSample], dict[str, int], dict[int, int]]:
    idx = rec.with_suffix(".idx")
    if not idx.is_file():
        raise ValueError(f"{rec}: index file {idx} not found")
    offsets = recordio.read_idx(idx)
    ids = recordio.image_record_ids(rec, offsets)
    ends = sorted(offsets.values()) + [rec.stat().st_size]
    next_offset = {o: ends[i + 1] for i, o in enumerate(ends[:-1])}
    samples = []
    with open(rec, "rb") as f:
        for rid in ids:
            where = f"{rec} record {rid}"
            size = next_offset[offsets[rid]] - offsets[rid]
            if size > max_bytes:
                problems.report("record too large", where, f"{size} bytes > {max_bytes}")
                continue
            try:
                payload = recordio.read_payload(f, offsets[rid], where)
                label = recordio.unpack_image(payload, where).label
            except ValueError as exc:
                problems.report("unreadable record", where, str(exc))
                continue
            if label != int(label) or label < 0 or (num_classes and label >= num_classes):
                problems.report("label out of range", where, f"label {label}")
                continue
            samples.append(SourceSample(str(rid), int(label), size))
    if not samples:
        raise ValueError(f"{rec}: no usable image records")
    labels = sorted({s.label for s in samples})
    return samples, {str(v): v for v in labels}, offsets


def plan_shards(samples: list[SourceSample], opts: ConvertOptions) -> list[list[int]]:
    """Global shuffle, then cut by sample count and (optionally) source bytes."""
    import numpy as np

    order = np.random.default_rng(opts.seed).permutation(len(samples)).tolist()
    shards: list[list[int]] = [[]]
    size = 0
    for pos in order:
        too_big = opts.max_shard_bytes and size + samples[pos].size > opts.max_shard_bytes
        if shards[-1] and (len(shards[-1]) >= opts.shard_size or too_big):
            shards.append([])
            size = 0
        shards[-1].append(pos)
        size += samples[pos].size
    return shards


def _encode(data: bytes, opts: ConvertOptions) -> tuple[bytes, str]:
    """Decode fully (catches corrupt/truncated files), then keep or re-encode the bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if opts.image_format == "jpeg":
            out = io.BytesIO()
            img.convert(keep_mode(img.mode)).save(out, "JPEG", quality=opts.jpeg_quality)
            return out.getvalue(), "jpg"
        ext = PIL_FORMAT_EXTENSION.get(img.format) or (
            img.format == "PPM" and PNM_MODE_EXTENSION.get(img.mode)
        )
        if not ext:
            raise ValueError(
                f"format {img.format}/{img.mode} not supported; use --image-format jpeg"
            )
        return data, ext


def _align(data: bytes, points, opts: ConvertOptions, where: str) -> bytes:
    return align_encoded(data, points, opts.align_size, where)


def _landmarks_by_ref(src: Path, samples: list[SourceSample], opts: ConvertOptions) -> dict | None:
    """``--landmarks``: each folder sample's 5 points (None where the file has none)."""
    if not opts.landmarks:
        return None
    table = read_landmarks_file(opts.landmarks)
    return {s.ref: table.get(Path(s.ref).relative_to(src).as_posix()) for s in samples}


def write_shard(job: ShardJob) -> tuple[int, ShardInfo, Problems, list[str]]:
    """Worker: write one complete shard; returns its info, problems and image extensions."""
    problems = Problems(job.options.on_bad)
    tar_path = Path(job.out_dir) / f"{shard_stem(job.index)}.tar"
    writer = ShardWriter(tar_path)
    exts: set[str] = set()
    rec = open(job.rec_path, "rb") if job.kind == "recordio" else None
    try:
        for position, sample in job.samples:
            if rec is None:
                where = sample.ref
                try:
                    data = read_source_file(sample.ref, job.options.max_image_bytes)
                except BadFile as exc:  # changed since the scan
                    problems.report(exc.kind, where, exc.detail)
                    continue
            else:
                where = f"{job.rec_path} record {sample.ref}"
                payload = recordio.read_payload(rec, job.rec_offsets[int(sample.ref)], where)
                data = recordio.unpack_image(payload, where).image
            if job.landmarks is not None:
                try:
                    data = _align(data, job.landmarks.get(sample.ref), job.options, where)
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad images
                    kind = getattr(exc, "kind", "corrupt image")
                    problems.report(kind, where, getattr(exc, "detail", str(exc)))
                    continue
            try:
                encoded, ext = _encode(data, job.options)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad images
                problems.report("corrupt image", where, f"{type(exc).__name__}: {exc}")
                continue
            exts.add(ext)
            writer.write(f"{position:09d}", {ext: encoded, "cls": str(sample.label).encode()})
        if writer.num_samples == 0:
            raise ValueError(f"{tar_path}: every sample of this shard was bad")
        size = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if rec is not None:
            rec.close()
    info = ShardInfo(tar_path.name, writer.num_samples, size)
    done = {"shard": asdict(info), "problems": asdict(problems), "exts": sorted(exts)}
    atomic_write_text(tar_path.with_suffix(".done.json"), json.dumps(done))
    return job.index, info, problems, sorted(exts)


def _load_done(path: Path) -> tuple[ShardInfo, Problems, list[str]]:
    done = json.loads(path.read_text())
    return ShardInfo(**done["shard"]), Problems(**done["problems"]), done["exts"]


def check_apart(src: Path, out_dir: Path) -> None:
    """UsageError when the output folder is, holds or lies inside the source (links resolved)."""
    source, out = src.resolve(), out_dir.resolve()
    if out == source:
        where = "is the source"
    elif source in out.parents:
        where = "lies inside the source"
    elif out in source.parents:
        where = "holds the source"
    else:
        return
    raise UsageError(f"{out_dir}: the output folder {where} {src}; choose a folder outside it")


def _is_output_file(entry: Path) -> bool:
    """A plain file (not a link) named like the files this converter writes."""
    return bool(OUTPUT_FILE.fullmatch(entry.name)) and stat.S_ISREG(entry.lstat().st_mode)


def _clear_previous_output(out_dir: Path, entries: list[Path]) -> None:
    """``--overwrite``: delete a previous output's files; anything else there is refused."""
    foreign = [e.name for e in entries if not _is_output_file(e)]
    if not (out_dir / PLAN_NAME).is_file() or foreign:
        what = f"holds {', '.join(foreign[:3])}" if foreign else f"has no {PLAN_NAME}"
        raise UsageError(
            f"{out_dir}: --overwrite only clears a previous output of dist-cosface shards, "
            f"and this folder {what}; choose a new or empty output folder"
        )
    for entry in entries:
        entry.unlink()


def _prepare_out_dir(out_dir: Path, plan: dict, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if overwrite and entries:
        _clear_previous_output(out_dir, entries)
        entries = []
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / PLAN_NAME
    if plan_path.exists():
        try:
            old = json.loads(plan_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{plan_path}: unreadable ({exc})") from exc
        if old != plan:
            changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            # suggest --overwrite only where it would work (nothing but our own files)
            ours = all(_is_output_file(e) for e in entries)
            advice = "pass --overwrite to start clean or " if ours else ""
            raise UsageError(
                f"{out_dir}: holds shards of a different conversion (differs in {changed}); "
                f"{advice}choose another output folder"
            )
    elif entries:
        names = ", ".join(e.name for e in entries[:3]) + (" ..." if len(entries) > 3 else "")
        raise UsageError(
            f"{out_dir}: not empty ({names}) and not an output of dist-cosface shards; "
            "choose a new or empty output folder"
        )
    atomic_write_text(plan_path, json.dumps(plan, indent=1))
    for stale in out_dir.glob("*.tmp"):
        if _is_output_file(stale):  # a write cut short; never someone else's .tmp file
            stale.unlink()


def convert(src: str | Path, out_dir: str | Path, opts: ConvertOptions) -> ConvertResult:
    """Convert an image folder or a ``.rec`` file into shards under ``out_dir``.

    Arguments that cannot be used (``src`` neither an image folder nor a ``.rec``,
    ``landmarks`` with a ``.rec``, an output folder that overlaps the source, is not a folder,
    holds something else or a different conversion) raise ``UsageError``; failures while
    converting (no usable samples, a missing index, an unreadable plan, a bad input under
    ``on_bad="stop"``, a shard whose every sample is bad) raise ``ValueError``.
    """
    src, out_dir = Path(src), Path(out_dir)
    check_apart(src, out_dir)
    if src.is_dir():
        kind = "folder"
    elif src.is_file() and src.suffix == ".rec":
        kind = "recordio"
    else:
        raise UsageError(f"{src}: not an image folder or a .rec file")
    if opts.landmarks and kind != "folder":
        raise UsageError(f"{src}: --landmarks needs an image folder source")
    problems = Problems(opts.on_bad)
    rec_offsets: dict[int, int] = {}
    if kind == "folder":
        samples, label_map = scan_folder(src, problems, opts.max_image_bytes)
    else:
        samples, label_map, rec_offsets = scan_recordio(
            src, opts.num_classes, problems, opts.max_image_bytes
        )
    landmarks = _landmarks_by_ref(src, samples, opts)
    num_classes = opts.num_classes or (max(label_map.values()) + 1)
    groups = plan_shards(samples, opts)
    # the read cap is left out: it only drops files (num_samples changes with them), and
    # outputs written before it existed still resume
    plan_opts = {
        k: v
        for k, v in asdict(opts).items()
        if k not in ("workers", "progress", "overwrite", "max_image_bytes")
    }
    if not opts.landmarks:  # outputs written before alignment existed still resume
        del plan_opts["landmarks"], plan_opts["align_size"]
    plan = {
        "source": str(src.resolve()),
        "options": plan_opts,
        "num_samples": len(samples),
        "num_shards": len(groups),
    }
    _prepare_out_dir(out_dir, plan, opts.overwrite)

    results: dict[int, tuple[ShardInfo, Problems, list[str]]] = {}
    jobs = []
    for i, group in enumerate(groups):
        done_path = out_dir / f"{shard_stem(i)}.done.json"
        if done_path.exists() and (out_dir / f"{shard_stem(i)}.idx").exists():
            results[i] = _load_done(done_path)
        else:
            members = [(pos, samples[pos]) for pos in group]
            marks = landmarks and {s.ref: landmarks[s.ref] for _, s in members}
            jobs.append(
                ShardJob(i, str(out_dir), kind, str(src), rec_offsets, members, opts, marks)
            )
    reused = len(results)
    _run_jobs(jobs, opts, results)

    exts: set[str] = set()
    for i in sorted(results):
        problems.merge(results[i][1])
        exts.update(results[i][2])
    shards = [results[i][0] for i in sorted(results)]
    manifest = Manifest(
        num_classes=num_classes,
        num_samples=sum(s.num_samples for s in shards),
        shards=shards,
        image_ext=";".join(sorted(exts)),
        source=str(src),
        skipped=dict(problems.counts),
    )
    publish_shard_set(out_dir, manifest, label_map)
    return ConvertResult(manifest, len(jobs), reused, problems)


def _run_jobs(jobs: list[ShardJob], opts: ConvertOptions, results: dict) -> None:
    from tqdm import tqdm

    show = sys.stderr.isatty() if opts.progress is None else opts.progress
    bar = tqdm(total=sum(len(j.samples) for j in jobs), unit="img", disable=not show)
    planned = {j.index: len(j.samples) for j in jobs}
    try:
        if opts.workers == 1 or len(jobs) <= 1:
            outputs = map(write_shard, jobs)
            for index, info, probs, exts in outputs:
                results[index] = (info, probs, exts)
                bar.update(planned[index])
            return
        with multiprocessing.get_context().Pool(min(opts.workers, len(jobs))) as pool:
            for index, info, probs, exts in pool.imap_unordered(write_shard, jobs):
                results[index] = (info, probs, exts)
                bar.update(planned[index])
    finally:
        bar.close()
