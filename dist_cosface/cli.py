"""The ``dist-cosface`` command line.

Subcommands import their implementation lazily so ``dist-cosface --help`` stays fast and
optional dependencies (DALI, DeepSpeed, onnx) are only needed by the commands that use them.

    dist-cosface train CONFIG.yaml [dotted.key=value ...]   (alone, or under torchrun/deepspeed)
    dist-cosface eval RUN_OR_CHECKPOINT --target FILE ... [--megaface P D] [--ijb ROOT NAME]
        [--ytf PAIRS FRAMES]                                (alone, or under torchrun)
    dist-cosface export RUN_OR_CHECKPOINT OUT.onnx
    dist-cosface shards SRC OUT_DIR [options]               (image folder or .rec -> shards)
    dist-cosface merge-classifier CHECKPOINT OUT.pt        (full classifier rows + state)
    dist-cosface config CONFIG.yaml [dotted.key=value ...]  (print the resolved config)
    dist-cosface synthetic-faces OUT_DIR [options]          (JPEG identity folders, generated)

Failures: a command that fails prints one line on stderr, ``dist-cosface <command>: error:
<message>`` (``config error:`` for config keys and values; ``dist-cosface <command> (rank
N):`` when a launcher runs several ranks, each rank printing its own line), and exits with
status 2 for a usage error (an argument, a config key or value, a path either names that is
missing or of the wrong kind) or 1 for a failure while running (bad data, a checkpoint that
does not verify, a locked run folder, ...). ``--debug`` (before or after the command) or
``DIST_COSFACE_DEBUG=1`` lets the exception through instead: Python prints the traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

DEBUG_ENV = "DIST_COSFACE_DEBUG"
MAX_SYNTHETIC_SIZE = 1024  # synthetic-faces --image-size: 9x the usual 112 px face crop


class UsageError(ValueError):
    """An argument that cannot be used as given (exit status 2, like argparse's own errors)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): every rank of a job prints one."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---- argument types: a bad value is an argparse error (one line, exit 2) ------------------


def int_in(low: int, high: int | None = None):
    """argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite float in the interval given (open ends as stated)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def existing_path(text: str) -> str:
    """argparse type: a file or folder that exists."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: not found")
    return text


def output_file(text: str) -> str:
    """argparse type: where a file will be written (not a folder, not under a file)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder; give the path of a file")
    _raise_if(text, _folder_problem(path.parent, path))
    return text


def new_folder(text: str) -> str:
    """argparse type: a folder to create (it must not exist; its parent must be creatable)."""
    if Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: already exists; choose a new folder")
    return output_folder(text)


def output_folder(text: str) -> str:
    """argparse type: a folder to write into (it may not exist yet; it must not be a file)."""
    _raise_if(text, _folder_problem(Path(text), Path(text)))
    return text


def _raise_if(text: str, problem: str) -> None:
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")


def _folder_problem(folder: Path, named: Path) -> str:
    """Why ``folder`` cannot be (made) a folder: its nearest existing ancestor is a file."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            if existing.is_dir():
                return ""
            return "is a file, not a folder" if existing == named else f"{existing} is a file"
    return ""


def device_arg(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA devices")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    return text


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML file; it only overrides the built-in defaults")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied after the YAML, e.g. optim.lr=0.2 train.total_steps=100",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from dist_cosface.config import load_config
    from dist_cosface.distributed import init_distributed, shutdown
    from dist_cosface.engine import train
    from dist_cosface.engine.signals import watch_launcher

    cfg = load_config(args.config, args.overrides)
    _check_train_paths(cfg)
    watch_launcher(grace_s=cfg.dist.timeout_s)  # stop when torchrun's agent is killed
    ctx = init_distributed(cfg.dist)
    try:
        summary = train(cfg, ctx)
    finally:
        shutdown(ctx)
    if summary["launcher_lost"]:  # not done: a surviving agent must not count this a success
        print(
            f"dist-cosface train{_rank_suffix()}: error: stopped because a launcher died; the "
            "checkpoint of this step is written: resume from it",
            file=sys.stderr,
        )
        return 1
    return 0


def _check_train_paths(cfg) -> None:
    """Paths the config names that cannot work, found before any process group is built."""
    from dist_cosface.configtools import ConfigError

    out = Path(cfg.train.output_dir)
    problem = _folder_problem(out, out)
    if problem:
        raise ConfigError(f"train.output_dir={cfg.train.output_dir!r}: {problem}")
    path = cfg.data.path
    local = path and not path.startswith("pipe:") and "://" not in path
    if cfg.data.backend != "synthetic" and local and not Path(path).exists():
        raise ConfigError(f"data.path={path!r}: not found (dist-cosface shards writes one)")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise ConfigError(f"checkpoint.resume={resume!r}: not found")


def _cmd_config(args: argparse.Namespace) -> int:
    from dist_cosface.config import config_to_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_synthetic_faces(args: argparse.Namespace) -> int:
    from dist_cosface.data.synth_shards import write_synthetic_image_folder

    path = write_synthetic_image_folder(
        args.out_dir,
        args.identities,
        args.images_per_identity,
        first_identity=args.first_identity,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(
        f"wrote {args.identities} x {args.images_per_identity} synthetic face JPEGs "
        f"(identities {args.first_identity}..{args.first_identity + args.identities - 1}) "
        f"to {path}"
    )
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    from dist_cosface.data.cli import run_shards

    return run_shards(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from dist_cosface.engine.checkpoint.reader import load_backbone
    from dist_cosface.eval.cli import run_eval_command

    return run_eval_command(args, load_backbone)


def _cmd_export(args: argparse.Namespace) -> int:
    from dist_cosface.engine.checkpoint.reader import load_backbone
    from dist_cosface.eval.cli import run_export_command

    return run_export_command(args, load_backbone)


def _cmd_merge_classifier(args: argparse.Namespace) -> int:
    from dist_cosface.engine.checkpoint.reader import run_merge_command

    return run_merge_command(args)


_DEBUG_HELP = f"on failure, show the traceback instead of one error line (or set {DEBUG_ENV}=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dist-cosface",
        description="Distributed CosFace (LMCL) face-recognition training.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # Launchers that pass the rank in argv (deepspeed without --no_local_rank, old
    # torch.distributed.launch) also set LOCAL_RANK, which is what distributed.py reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = _add_command(sub, "train", "train (alone or as the program torchrun starts)")
    _add_config_arguments(train)
    train.set_defaults(func=_cmd_train)

    show = _add_command(sub, "config", "print the resolved config and exit")
    _add_config_arguments(show)
    show.set_defaults(func=_cmd_config)

    faces = _add_command(
        sub, "synthetic-faces", "write generated face JPEGs as OUT_DIR/<identity>/<image>.jpg"
    )
    faces.add_argument("out_dir", type=new_folder, help="folder to create (must not exist)")
    faces.add_argument("--identities", type=int_in(1), default=64)
    faces.add_argument("--images-per-identity", type=int_in(1), default=32)
    faces.add_argument(
        "--first-identity",
        type=int_in(0),
        default=0,
        help="number of the first identity; disjoint ranges give held-out identities",
    )
    # a face crop: 112 px is the usual training size; far larger only costs memory and time
    faces.add_argument("--image-size", type=int_in(16, MAX_SYNTHETIC_SIZE), default=112)
    faces.add_argument("--seed", type=int, default=0)
    faces.set_defaults(func=_cmd_synthetic_faces)

    _add_lazy(
        sub,
        "shards",
        "convert an image folder or a .rec file into WebDataset shards",
        "dist_cosface.data.cli",
        "add_shards_arguments",
        _cmd_shards,
    )
    _add_lazy(
        sub,
        "eval",
        "verification / identification benchmarks of a trained backbone",
        "dist_cosface.eval.cli",
        "add_eval_arguments",
        _cmd_eval,
    )
    _add_lazy(
        sub,
        "export",
        "export a trained backbone to ONNX",
        "dist_cosface.eval.cli",
        "add_export_arguments",
        _cmd_export,
    )
    _add_lazy(
        sub,
        "merge-classifier",
        "write a checkpoint's full classifier matrix and row state to one .pt file",
        "dist_cosface.engine.checkpoint.reader",
        "add_merge_arguments",
        _cmd_merge_classifier,
    )
    return parser


def _add_lazy(sub, name, help_text, module, adder, func) -> None:
    """Register a subcommand whose arguments are declared by its own module."""
    import importlib

    parser = _add_command(sub, name, help_text)
    getattr(importlib.import_module(module), adder)(parser)
    parser.set_defaults(func=func)


def _add_command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand parser that also takes ``--debug`` after the command name."""
    parser = sub.add_parser(name, help=help_text)
    # SUPPRESS: when absent here, the value given before the command name stays
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if debug:
        logging.getLogger("dist_cosface").setLevel(logging.DEBUG)
    try:
        return args.func(args)
    except Exception as exc:
        if debug:
            raise
        status, text = describe_failure(exc)
        parser.exit(status, f"dist-cosface {args.command}{_rank_suffix()}: {text}\n")


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """(exit status, one line) for a failure: 2 for usage errors, 1 for failures while running.

    Input and run errors (ValueError and its kin, OSError, a locked run folder, a non-finite
    loss, a compiler that does not work here) carry messages that name the file, key or value;
    anything else is unexpected and the line says so, with its type and how to see the
    traceback.
    """
    from dist_cosface.configtools import ConfigError
    from dist_cosface.engine.runlock import RunFolderLocked
    from dist_cosface.engine.strategy import CompilerUnavailable

    if isinstance(exc, ConfigError):
        return 2, "config error: " + _one_line(exc)
    status = 2 if isinstance(exc, UsageError) else 1
    if isinstance(exc, OSError) and exc.filename is not None:
        return status, f"error: {exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, MemoryError):  # often without a message
        return status, "error: out of memory" + (f": {_one_line(exc)}" if str(exc) else "")
    if isinstance(
        exc,
        (ValueError, TypeError, OSError, RunFolderLocked, FloatingPointError, CompilerUnavailable),
    ):
        return status, "error: " + _one_line(exc)
    return status, (
        f"error: {type(exc).__name__}: {_one_line(exc)} (unexpected: rerun with --debug or "
        f"{DEBUG_ENV}=1 for the traceback)"
    )


def _one_line(exc: BaseException) -> str:
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _rank_suffix() -> str:
    """`` (rank N)`` under a launcher with several ranks (each rank prints its own line)."""
    try:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    return f" (rank {os.environ.get('RANK', '?')})" if several else ""


if __name__ == "__main__":
    # through the package: ``python -m`` would otherwise hold a second copy of this module,
    # whose UsageError is not the one the subcommands raise
    from dist_cosface.cli import main as package_main

    sys.exit(package_main())
