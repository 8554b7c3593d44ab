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
    dist-cosface clean RUN SHARDS OUT [--eval-set PATH ...]  (label noise, duplicates, overlap;
                                                            alone or under torchrun)
"""

from __future__ import annotations

import argparse
import logging
import sys


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
    watch_launcher(grace_s=cfg.dist.timeout_s)  # stop when torchrun's agent is killed
    ctx = init_distributed(cfg.dist)
    try:
        summary = train(cfg, ctx)
    finally:
        shutdown(ctx)
    if summary["launcher_lost"]:  # not done: a surviving agent must not count this a success
        print("stopped because a launcher died; resume from the checkpoint", file=sys.stderr)
        return 1
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from dist_cosface.config import config_to_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_synthetic_faces(args: argparse.Namespace) -> int:
    from dist_cosface.data.synth_shards import write_synthetic_image_folder

    try:
        path = write_synthetic_image_folder(
            args.out_dir,
            args.identities,
            args.images_per_identity,
            first_identity=args.first_identity,
            image_size=args.image_size,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"dist-cosface synthetic-faces: error: {exc}", file=sys.stderr)
        return 2
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
    from dist_cosface.engine.ckpt_read import load_backbone
    from dist_cosface.eval.cli import run_eval_command

    return run_eval_command(args, load_backbone)


def _cmd_export(args: argparse.Namespace) -> int:
    from dist_cosface.engine.ckpt_read import load_backbone
    from dist_cosface.eval.cli import run_export_command

    return run_export_command(args, load_backbone)


def _cmd_clean(args: argparse.Namespace) -> int:
    from dist_cosface.clean.cli import run_clean_command

    return run_clean_command(args)


def _cmd_merge_classifier(args: argparse.Namespace) -> int:
    from dist_cosface.engine.ckpt_read import run_merge_command

    return run_merge_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-cosface",
        description="Distributed CosFace (LMCL) face-recognition training.",
    )
    # Launchers that pass the rank in argv (deepspeed without --no_local_rank, old
    # torch.distributed.launch) also set LOCAL_RANK, which is what distributed.py reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (alone or as the program torchrun starts)")
    _add_config_arguments(train)
    train.set_defaults(func=_cmd_train)

    show = sub.add_parser("config", help="print the resolved config and exit")
    _add_config_arguments(show)
    show.set_defaults(func=_cmd_config)

    faces = sub.add_parser(
        "synthetic-faces", help="write generated face JPEGs as OUT_DIR/<identity>/<image>.jpg"
    )
    faces.add_argument("out_dir", help="folder to create (must not exist)")
    faces.add_argument("--identities", type=int, default=64)
    faces.add_argument("--images-per-identity", type=int, default=32)
    faces.add_argument(
        "--first-identity",
        type=int,
        default=0,
        help="number of the first identity; disjoint ranges give held-out identities",
    )
    faces.add_argument("--image-size", type=int, default=112)
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
        "dist_cosface.engine.ckpt_read",
        "add_merge_arguments",
        _cmd_merge_classifier,
    )
    _add_lazy(
        sub,
        "clean",
        "find label noise, duplicate identities and train/eval overlap; write a cleaned set",
        "dist_cosface.clean.cli",
        "add_clean_arguments",
        _cmd_clean,
    )
    return parser


def _add_lazy(sub, name, help_text, module, adder, func) -> None:
    """Register a subcommand whose arguments are declared by its own module."""
    import importlib

    parser = sub.add_parser(name, help=help_text)
    getattr(importlib.import_module(module), adder)(parser)
    parser.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    from dist_cosface.configtools import ConfigError

    try:
        return args.func(args)
    except ConfigError as exc:
        parser.exit(2, f"dist-cosface {args.command}: config error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
