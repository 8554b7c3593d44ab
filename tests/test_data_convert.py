"""Converters: image folders and RecordIO packs -> shards; resume; bad inputs."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tarfile

import pytest

from dist_cosface.data.convert import ConvertOptions, convert
from dist_cosface.data.recordio import MAGIC
from dist_cosface.data.shards import read_index
from tests.data_common import ORL, REPO, YALEB, jpeg_bytes, need


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_orl_folder_roundtrip(tmp_path):
    orl = need(ORL)
    result = convert(orl, tmp_path, ConvertOptions(shard_size=64, seed=3, workers=2))
    m = result.manifest
    assert (m.num_samples, m.num_classes, len(m.shards)) == (400, 40, 7)
    assert [s.num_samples for s in m.shards] == [64] * 6 + [16]
    label_map = json.loads((tmp_path / "labels.json").read_text())
    assert label_map == {name: i for i, name in enumerate(sorted(f"s{i}" for i in range(1, 41)))}
    seen = {}
    for shard in m.shards:
        members = _members(tmp_path / shard.name)
        index = read_index(tmp_path / shard.index_name)
        assert len(index) == shard.num_samples
        for entry in index:
            pgm, cls = members[f"{entry.key}.pgm"], members[f"{entry.key}.cls"]
            seen[pgm] = int(cls)  # kept bytes: identical to the source file
    expected = {p.read_bytes(): label_map[p.parent.name] for p in orl.glob("s*/*.pgm")}
    assert seen == expected
    first_labels = [
        int(_members(tmp_path / m.shards[0].name)[f"{e.key}.cls"])
        for e in read_index(tmp_path / m.shards[0].index_name)
    ]
    assert len(set(first_labels)) > 20, "shards must be shuffled across identities"
    assert m.image_ext == "pgm" and m.skipped == {"ignored top-level file": 1}


def test_resume_skips_finished_shards_and_cleans_partial(tmp_path):
    src = need(YALEB) / "yaleB01"
    folder = tmp_path / "src" / "yaleB01"
    folder.mkdir(parents=True)
    for p in sorted(src.glob("*.jpg"))[:12]:
        (folder / p.name).symlink_to(p.resolve())
    out = tmp_path / "out"
    opts = ConvertOptions(shard_size=4)
    convert(tmp_path / "src", out, opts)
    before = (out / "shard-000000.tar").stat().st_mtime_ns
    # simulate a crash while writing shard 2: a temp file, no done marker, no index
    (out / "shard-000002.done.json").unlink()
    (out / "shard-000002.idx").unlink()
    (out / "shard-000002.tar").rename(out / "shard-000002.tar.tmp")
    again = convert(tmp_path / "src", out, opts)
    assert (again.written, again.reused) == (1, 2)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before
    assert not list(out.glob("*.tmp")) and (out / "shard-000002.idx").exists()
    with pytest.raises(ValueError, match="different conversion"):
        convert(tmp_path / "src", out, ConvertOptions(shard_size=5))
    clean = convert(tmp_path / "src", out, ConvertOptions(shard_size=5, overwrite=True))
    assert (clean.written, clean.reused, len(clean.manifest.shards)) == (3, 0, 3)


def test_byte_limit_and_jpeg_reencode(tmp_path):
    src = tmp_path / "src"
    for ident in range(3):
        (src / f"id{ident}").mkdir(parents=True)
        for k in range(4):
            (src / f"id{ident}" / f"{k}.jpg").write_bytes(jpeg_bytes(ident * 10 + k, 32))
    size = max(p.stat().st_size for p in src.rglob("*.jpg"))
    r = convert(src, tmp_path / "o", ConvertOptions(max_shard_bytes=3 * size, image_format="jpeg"))
    assert all(s.num_samples <= 3 for s in r.manifest.shards)
    assert r.manifest.num_samples == 12 and r.manifest.image_ext == "jpg"


def _record(label: float, image: bytes, extra_labels: tuple = ()) -> bytes:
    flag = len(extra_labels)
    header = struct.pack("<IfQQ", flag, label, 0, 0)
    payload = header + b"".join(struct.pack("<f", v) for v in extra_labels) + image
    body = struct.pack("<II", MAGIC, len(payload)) + payload
    return body + b"\0" * (-len(body) % 4)


def write_rec(path, labels: list[float], bad_label_at: int = -1):
    """insightface-style pack: record 0 = header (images are 1..n), then identity records."""
    n = len(labels)
    records = [_record(0.0, b"", (float(n + 1), float(n + 1 + len(set(labels)))))]
    for i, label in enumerate(labels):
        records.append(_record(label, jpeg_bytes(100 + i, 24)))
    records.append(_record(0.0, b"", (1.0, 3.0)))  # an identity record: not an image
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for rec in records:
            offsets.append(pos)
            f.write(rec)
            pos += len(rec)
    path.with_suffix(".idx").write_text("".join(f"{i}\t{o}\n" for i, o in enumerate(offsets)))


def test_recordio_roundtrip(tmp_path):
    labels = [0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 1.0]
    write_rec(tmp_path / "train.rec", labels)
    r = convert(tmp_path / "train.rec", tmp_path / "o", ConvertOptions(shard_size=3))
    assert (r.manifest.num_samples, r.manifest.num_classes, len(r.manifest.shards)) == (7, 3, 3)
    got = {}
    for shard in r.manifest.shards:
        members = _members(tmp_path / "o" / shard.name)
        for e in read_index(tmp_path / "o" / shard.index_name):
            got[members[f"{e.key}.jpg"]] = int(members[f"{e.key}.cls"])
    assert got == {jpeg_bytes(100 + i, 24): int(v) for i, v in enumerate(labels)}


def test_recordio_bad_labels(tmp_path):
    write_rec(tmp_path / "t.rec", [0.0, 1.0, 7.0, 1.5])
    r = convert(tmp_path / "t.rec", tmp_path / "o", ConvertOptions(num_classes=5))
    assert r.manifest.num_samples == 2 and r.problems.counts == {"label out of range": 2}
    assert any("t.rec record 3" in e for e in r.problems.examples)
    with pytest.raises(ValueError, match=r"t.rec record 3: label out of range"):
        convert(tmp_path / "t.rec", tmp_path / "o2", ConvertOptions(num_classes=5, on_bad="stop"))


def _bad_folder(root):
    for ident in ("a", "b"):
        (root / ident).mkdir(parents=True)
        for k in range(3):
            (root / ident / f"{k}.jpg").write_bytes(jpeg_bytes(k, 20))
    good = jpeg_bytes(9, 20)
    (root / "a" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "empty_id").mkdir()


@pytest.mark.parametrize("workers", [1, 2])
def test_folder_bad_inputs_skip_and_count(tmp_path, workers):
    _bad_folder(tmp_path / "src")
    r = convert(tmp_path / "src", tmp_path / "o", ConvertOptions(shard_size=4, workers=workers))
    assert r.manifest.num_samples == 6 and r.manifest.num_classes == 2
    assert r.problems.counts == {
        "non-image file": 1,
        "empty identity folder": 1,
        "corrupt image": 1,
    }
    text = r.summary()
    assert "broken.jpg: corrupt image" in text and "notes.txt" in text and "empty_id" in text


@pytest.mark.parametrize(
    "remove, message",
    [
        (["notes"], r"empty_id: empty identity folder"),
        (["notes", "empty"], r"broken.jpg: corrupt image"),
        ([], r"notes.txt: non-image file"),
    ],
)
def test_folder_bad_inputs_stop(tmp_path, remove, message):
    _bad_folder(tmp_path / "src")
    if "notes" in remove:
        (tmp_path / "src" / "b" / "notes.txt").unlink()
    if "empty" in remove:
        (tmp_path / "src" / "empty_id").rmdir()
    with pytest.raises(ValueError, match=message):
        convert(tmp_path / "src", tmp_path / "o", ConvertOptions(on_bad="stop", workers=2))
    assert not list((tmp_path / "o").glob("*.tar")), "no shard may look complete after a stop"


def test_cli_and_tool(tmp_path, capsys):
    from dist_cosface.cliargs import UsageError
    from dist_cosface.data.cli import add_shards_arguments, run_shards
    from tools import make_shards

    parser = argparse.ArgumentParser()
    add_shards_arguments(parser)
    write_rec(tmp_path / "p.rec", [0.0, 1.0, 1.0])
    args = parser.parse_args([str(tmp_path / "p.rec"), str(tmp_path / "o"), "--shard-size", "2"])
    assert run_shards(args) == 0
    assert "3 samples, 2 classes, 2 shards" in capsys.readouterr().out
    args = parser.parse_args([str(tmp_path / "missing"), str(tmp_path / "o2")])
    with pytest.raises(UsageError, match="missing: not an image folder or a .rec file"):
        run_shards(args)
    with pytest.raises(SystemExit) as exit_info:  # the tool is the command: same exit status
        make_shards.main([str(tmp_path / "missing"), str(tmp_path / "o2")])
    assert exit_info.value.code == 2 and "missing: not an" in capsys.readouterr().err
    tool = subprocess.run(
        [sys.executable, "tools/make_shards.py", str(tmp_path / "p.rec"), str(tmp_path / "o3")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert tool.returncode == 0 and "3 samples" in tool.stdout


def _shards_case(root, case):
    """Builds what ``case`` needs under ``root``; returns the arguments after ``shards``."""
    rec, out = root / "p.rec", root / "o"
    write_rec(rec, [0.0, 1.0, 1.0])
    if case in ("out is a file", "out not ours", "--overwrite not ours"):
        (root / "taken").mkdir()
        (root / "taken" / "README").write_text("mine")
        (root / "file").write_text("mine")
        out = root / ("file" if case == "out is a file" else "taken")
        return [str(rec), str(out)] + (["--overwrite"] if case.startswith("--") else [])
    if case == "other conversion":
        convert(rec, out, ConvertOptions(shard_size=2))
        return [str(rec), str(out), "--shard-size", "3"]
    if case == "plan unreadable":
        out.mkdir()
        (out / "_plan.json").write_text("{not json")
    if case == "no index":
        rec.with_suffix(".idx").unlink()
    if case in ("every sample bad", "stop at a bad image"):
        (root / "src" / "a").mkdir(parents=True)
        (root / "src" / "a" / "0.jpg").write_bytes(b"not a jpeg")
        good = [] if case == "every sample bad" else [("1.jpg", 0), ("2.jpg", 1)]
        for name, seed in good:
            (root / "src" / "a" / name).write_bytes(jpeg_bytes(seed, 16))
        stop = ["--on-bad", "stop"] if case == "stop at a bad image" else []
        return [str(root / "src"), str(out), *stop]
    if case == "no usable records":
        write_rec(rec, [-1.0, -2.0])  # labels out of range: skipped, nothing left
    args = {
        "src missing": [str(root / "missing"), str(out)],
        "landmarks with .rec": [str(rec), str(out), "--landmarks", str(root / "lm.txt")],
        "out is src": [str(root), str(root)],
        "shard size 0": [str(rec), str(out), "--shard-size", "0"],
        "jpeg quality 101": [str(rec), str(out), "--jpeg-quality", "101"],
    }
    return args.get(case, [str(rec), str(out)])


@pytest.mark.parametrize(
    "case, status, needle",
    [
        ("src missing", 2, "missing: not an image folder or a .rec file"),
        ("landmarks with .rec", 2, "p.rec: --landmarks needs an image folder source"),
        ("out is src", 2, "the output folder is the source"),
        ("out is a file", 2, "file: exists and is not a folder"),
        ("out not ours", 2, "taken: not empty (README) and not an output of"),
        ("--overwrite not ours", 2, "--overwrite only clears a previous output"),
        ("other conversion", 2, "holds shards of a different conversion (differs in ['num_"),
        ("shard size 0", 2, "shard_size must be >= 1, got 0"),
        ("jpeg quality 101", 2, "jpeg_quality must be in [1, 100], got 101"),
        ("no usable records", 1, "p.rec: no usable image records"),
        ("no index", 1, "p.rec: index file"),
        ("every sample bad", 1, "every sample of this shard was bad"),
        ("stop at a bad image", 1, "0.jpg: corrupt image"),
        ("plan unreadable", 1, "_plan.json: unreadable"),
    ],
)
def test_shards_exit_status(tmp_path, capsys, case, status, needle):
    """2 and one line for an argument that cannot be used; 1 for a failure while converting."""
    from dist_cosface.cli import main

    argv = ["shards", *_shards_case(tmp_path, case), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == status, err
    assert err.startswith("dist-cosface shards: error: ") and err.count("\n") == 1, err
    assert needle in err


# ---------------------------------------------------------------- nothing destroyed


def _tiny_folder(root, identities=("a", "b"), per_identity=2):
    for ident in identities:
        (root / ident).mkdir(parents=True)
        for k in range(per_identity):
            (root / ident / f"{k}.jpg").write_bytes(jpeg_bytes(k, 16))
    return root


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "layout, message",
    [
        ("out=src", r"the output folder is the source"),
        ("out holds src", r"the output folder holds the source"),
        ("out inside src", r"the output folder lies inside the source"),
        ("out holds .rec", r"the output folder holds the source"),
    ],
)
@pytest.mark.parametrize("overwrite", [True, False])
def test_output_overlapping_the_source_is_refused(tmp_path, layout, message, overwrite):
    if layout == "out holds .rec":
        write_rec(tmp_path / "t.rec", [0.0, 1.0])
        src, out = tmp_path / "t.rec", tmp_path
    else:
        src = _tiny_folder(tmp_path / "faces")
        out = {"out=src": src, "out holds src": tmp_path, "out inside src": src / "shards"}[layout]
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=message):
        convert(src, out, ConvertOptions(overwrite=overwrite))
    assert _snapshot(tmp_path) == before, "the source (or anything beside it) was touched"


def test_overwrite_clears_only_a_previous_output(tmp_path):
    src = _tiny_folder(tmp_path / "src")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "x.tmp").write_text("mine too")
    for overwrite in (False, True):
        with pytest.raises(ValueError) as err:
            convert(src, foreign, ConvertOptions(overwrite=overwrite))
        assert "notes.txt" in str(err.value) and "choose a new or empty" in str(err.value)
        assert overwrite or "--overwrite" not in str(err.value)  # it would not help
    assert _snapshot(foreign) == ["notes.txt", "x.tmp"]

    out = tmp_path / "out"
    first = convert(src, out, ConvertOptions(shard_size=2))
    assert len(first.manifest.shards) == 2
    with pytest.raises(ValueError, match=r"different conversion .*pass --overwrite"):
        convert(src, out, ConvertOptions(shard_size=3))
    again = convert(src, out, ConvertOptions(shard_size=3, overwrite=True))
    assert (again.written, len(again.manifest.shards)) == (2, 2)
    (out / "README").write_text("added by the user")  # resume keeps it; --overwrite refuses
    with pytest.raises(ValueError, match=r"different conversion .*\]\); choose another"):
        convert(src, out, ConvertOptions(shard_size=4))
    with pytest.raises(ValueError, match=r"--overwrite only clears .* holds README"):
        convert(src, out, ConvertOptions(shard_size=4, overwrite=True))
    assert (out / "README").exists() and (out / "shard-000001.tar").exists()


# ---------------------------------------------------------------- special files


def _in_child(fn, *args, timeout_s=60):
    """``fn(*args)`` in a forked child capped at +1 GiB of address space: a read of /dev/zero
    or a FIFO that blocks fails this test instead of filling the memory or hanging it."""
    import multiprocessing
    import resource

    def child(conn):
        status = open("/proc/self/status").read()
        vm = int(next(line.split()[1] for line in status.splitlines() if line[:7] == "VmSize:"))
        limit = vm * 1024 + (1 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(exc).__name__}: {exc}"))

    ctx = multiprocessing.get_context("fork")
    parent, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(child_end,))
    proc.start()
    child_end.close()  # a child that dies closes the pipe: recv() then fails at once
    try:
        if not parent.poll(timeout_s):
            pytest.fail(f"{fn.__name__} did not finish in {timeout_s} s (blocked on a read?)")
        return parent.recv()
    finally:
        proc.kill()
        proc.join()


def _special_folder(root, outside):
    import socket

    src = _tiny_folder(root, per_identity=2)
    a = src / "a"
    os.mkfifo(a / "fifo.jpg")
    (a / "zero.jpg").symlink_to("/dev/zero")
    (a / "dangling.jpg").symlink_to(root / "missing.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(a / "sock.jpg"))
    sock.close()
    (src / "b" / "big.jpg").write_bytes(jpeg_bytes(7, 64))  # over the cap set below
    outside.write_bytes(jpeg_bytes(8, 16))
    (src / "b" / "outside.jpg").symlink_to(outside)  # a link out of SRC to a regular file
    return src


def _convert_special(src, out, on_bad):
    from dist_cosface.data.convert import read_source_file

    cap = len(jpeg_bytes(7, 64)) - 1
    result = {}
    for name in ("fifo.jpg", "zero.jpg", "sock.jpg"):  # a file swapped in after the scan
        try:
            read_source_file(str(src / "a" / name), cap)
        except ValueError as exc:
            result[name] = str(exc)
    try:
        r = convert(src, out, ConvertOptions(on_bad=on_bad, max_image_bytes=cap))
    except ValueError as exc:
        return result, str(exc)
    return result, (r.manifest.num_samples, r.problems.counts, r.summary())


@pytest.mark.timeout(120)
def test_special_files_are_never_read(tmp_path):
    src = _special_folder(tmp_path / "src", tmp_path / "elsewhere.jpg")
    status, (direct, (samples, counts, summary)) = _in_child(
        _convert_special, src, tmp_path / "o", "skip"
    )
    assert status == "ok"
    assert direct == {
        "fifo.jpg": f"{src}/a/fifo.jpg: not a regular file (a FIFO)",
        "zero.jpg": f"{src}/a/zero.jpg: not a regular file (a character device)",
        "sock.jpg": f"{src}/a/sock.jpg: unreadable file (No such device or address)",
    }
    assert samples == 5  # 4 images + the link to a regular file outside SRC
    assert counts == {"unreadable file": 1, "not a regular file": 3, "file too large": 1}
    for name, why in [
        ("a/dangling.jpg", "unreadable file (No such file or directory)"),
        ("a/fifo.jpg", "not a regular file (a FIFO)"),
        ("a/sock.jpg", "not a regular file (a socket)"),
        ("a/zero.jpg", "not a regular file (a character device)"),
        ("b/big.jpg", "file too large"),
    ]:
        assert f"{src}/{name}: {why}" in summary
    status, (_, message) = _in_child(_convert_special, src, tmp_path / "o2", "stop")
    assert status == "ok"
    assert message == f"{src}/a/dangling.jpg: unreadable file (No such file or directory)"
