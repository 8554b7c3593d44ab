"""What every subcommand's arguments share: argparse value types and :class:`UsageError`.

A bad value given to one of these types is an argparse error (one line, exit status 2); a
subcommand that finds an unusable argument later raises :class:`UsageError` (also status 2).
The modules that declare subcommands (``cli.py``, ``eval/cli.py``, ``export.py``) take
them from here, below all of them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# how ``eval`` and ``export`` load a trained backbone: (checkpoint or run folder) -> (backbone,
# input image size); the engine supplies it, so those commands know no checkpoint format
LoadBackbone = Callable[[str], tuple[nn.Module, int]]


class UsageError(ValueError):
    """An argument that cannot be used as given (exit status 2, like argparse's own errors)."""


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
    _raise_if(text, folder_problem(path.parent, path))
    return text


def new_folder(text: str) -> str:
    """argparse type: a folder to create (it must not exist; its parent must be creatable)."""
    if Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: already exists; choose a new folder")
    return output_folder(text)


def output_folder(text: str) -> str:
    """argparse type: a folder to write into (it may not exist yet; it must not be a file)."""
    _raise_if(text, folder_problem(Path(text), Path(text)))
    return text


def _raise_if(text: str, problem: str) -> None:
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")


def folder_problem(folder: Path, named: Path) -> str:
    """Why ``folder`` cannot be (made) a folder: its nearest existing ancestor is a file."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            if existing.is_dir():
                return ""
            return "is a file, not a folder" if existing == named else f"{existing} is a file"
    return ""


def device_arg(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
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
