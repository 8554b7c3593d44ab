"""The ``dist-cosface`` command line.

The subcommand modules import their optional dependencies (DALI, DeepSpeed, onnx) inside
the functions that use them, so ``dist-cosface --help`` and every command that does not use
one work without them.

    dist-cosface train CONFIG.yaml [dotted.key=value ...]   (alone, or under torchrun/deepspeed)
    dist-cosface eval RUN_OR_CHECKPOINT --target FILE ... [--megaface P D] [--ijb ROOT NAME]
        [--ytf PAIRS FRAMES]                                (alone, or under torchrun)
    dist-cosface export RUN_OR_CHECKPOINT OUT.onnx
    dist-cosface shards SRC OUT_DIR [options]               (image folder or .rec -> shards)
    dist-cosface merge-classifier CHECKPOINT OUT.pt        (full classifier rows + state)
    dist-cosface config CONFIG.yaml [dotted.key=value ...]  (print the resolved config)
    dist-cosface synthetic-faces OUT_DIR [options]          (JPEG identity folders, generated)
    dist-cosface clean RUN SHARDS OUT [--eval-set PATH ...]  (label noise, duplicates, overlap;
                                                            alone or under torchrun)

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
import os
import sys
from pathlib import Path

from dist_cosface import export
from dist_cosface.clean import cli as clean_cli
from dist_cosface.cliargs import UsageError, folder_problem, int_in, new_folder
from dist_cosface.config import config_to_yaml, load_config
from dist_cosface.configtools import ConfigError
from dist_cosface.data import cli as data_cli
from dist_cosface.data.synth_shards import write_synthetic_image_folder
from dist_cosface.distributed import init_distributed, shutdown
from dist_cosface.engine import progress, train
from dist_cosface.engine.checkpoint import reader as checkpoint_reader
from dist_cosface.engine.runlock import RunFolderLocked
from dist_cosface.engine.signals import watch_launcher
from dist_cosface.engine.strategy import CompilerUnavailable
from dist_cosface.eval import cli as eval_cli

DEBUG_ENV = "DIST_COSFACE_DEBUG"
MAX_SYNTHETIC_SIZE = 1024  # synthetic-faces --image-size: 9x the usual 112 px face crop


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): every rank of a job prints one."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML file; it only overrides the built-in defaults")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied after the YAML, e.g. optim.lr=0.2 train.total_steps=100",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _check_train_paths(cfg)
    watch_launcher(grace_s=cfg.dist.timeout_s)  # stop when torchrun's agent is killed
    ctx = init_distributed(cfg.dist)
    try:
        summary = train(cfg, ctx)
    finally:
        shutdown(ctx)
    if summary.launcher_lost:  # not done: a surviving agent must not count this a success
        print(
            f"dist-cosface train{_rank_suffix()}: error: stopped because a launcher died; the "
            "checkpoint of this step is written: resume from it",
            file=sys.stderr,
        )
        return 1
    return 0


def _check_train_paths(cfg) -> None:
    """Paths the config names that cannot work, found before any process group is built."""
    out = Path(cfg.train.output_dir)
    problem = folder_problem(out, out)
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
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_synthetic_faces(args: argparse.Namespace) -> int:
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


# the subcommands' own modules are called through their module, so that a test can replace
# a function there (monkeypatch) and the command runs the replacement
def _cmd_shards(args: argparse.Namespace) -> int:
    return data_cli.run_shards(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    return eval_cli.run_eval_command(args, checkpoint_reader.load_backbone)


def _cmd_export(args: argparse.Namespace) -> int:
    return export.run_export_command(args, checkpoint_reader.load_backbone)


def _cmd_clean(args: argparse.Namespace) -> int:
    return clean_cli.run_clean_command(args)


def _cmd_merge_classifier(args: argparse.Namespace) -> int:
    return checkpoint_reader.run_merge_command(args)


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

    _add_declared(
        sub,
        "shards",
        "convert an image folder or a .rec file into WebDataset shards",
        data_cli.add_shards_arguments,
        _cmd_shards,
    )
    _add_declared(
        sub,
        "eval",
        "verification / identification benchmarks of a trained backbone",
        eval_cli.add_eval_arguments,
        _cmd_eval,
    )
    _add_declared(
        sub, "export", "export a trained backbone to ONNX", export.add_export_arguments, _cmd_export
    )
    _add_declared(
        sub,
        "merge-classifier",
        "write a checkpoint's full classifier matrix and row state to one .pt file",
        checkpoint_reader.add_merge_arguments,
        _cmd_merge_classifier,
    )
    _add_declared(
        sub,
        "clean",
        "find label noise, duplicate identities and train/eval overlap; write a cleaned set",
        clean_cli.add_clean_arguments,
        _cmd_clean,
    )
    return parser


def _add_declared(sub, name, help_text, add_arguments, func) -> None:
    """Register a subcommand whose arguments are declared by its own module."""
    parser = _add_command(sub, name, help_text)
    add_arguments(parser)
    parser.set_defaults(func=func)


def _add_command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand parser that also takes ``--debug`` after the command name."""
    parser = sub.add_parser(name, help=help_text)
    # SUPPRESS: when absent here, the value given before the command name stays
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


class _StdoutLines(logging.Handler):
    """Each record as a bare line on the current ``sys.stdout`` (flushed, as ``print`` does)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), flush=True)
        except Exception:  # logging's rule: a failing handler reports, never raises
            self.handleError(record)


def configure_logging() -> None:
    """The CLI's logging (also for tools that call ``engine.train``): diagnostics on stderr
    with time and source; rank 0's run output (the progress and ``eval`` result lines,
    ``engine.progress``) bare on stdout, and only there."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_output = logging.getLogger(progress.__name__)
    if not any(isinstance(h, _StdoutLines) for h in run_output.handlers):  # main() may rerun
        run_output.addHandler(_StdoutLines())
    run_output.propagate = False


def main(argv: list[str] | None = None) -> int:
    configure_logging()
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
    sys.exit(main())
