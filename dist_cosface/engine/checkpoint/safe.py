"""Reading checkpoint files without running code from them: the allow-lists every reader uses.

A checkpoint folder is data, wherever it came from. Resume, ``eval``, ``export`` and
``merge-classifier`` all read it the same way (docs/training.md, "What reading a checkpoint
trusts"):

1. ``meta.json`` is JSON. It records the size and CRC32 of every other file, and a file is
   checked against its record before it is read for anything else (``files``).
2. ``.metadata``, DCP's index, is a pickle: :class:`IndexUnpickler` builds nothing but DCP's
   metadata classes, ``torch.Size``, dtypes and layouts, and refuses the checkpoint at the first
   other name (a function to call, a foreign class). The index may point only at files that
   meta.json records, and may not ask for storage transforms.
3. Tensors: DCP's ``FileSystemReader`` loads them with ``torch.load(weights_only=True)``, torch's
   own allow-list.
4. Non-tensor values (loader positions, RNG states, optimizer settings): format 4 stores them as
   JSON in uint8 tensors (:func:`encode_plain`); an index that declares a pickled entry is
   refused. Format 3 stored them pickled; they load through ``weights_only=True`` as well
   (:class:`SafeLoadPlanner`), so a pickle that would build anything else is refused.
5. DeepSpeed's own files under ``deepspeed/`` (``deepspeed_native``) load through
   ``weights_only=True`` plus the three DeepSpeed classes its ZeRO optimizer state holds.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from dist_cosface.engine.checkpoint.contract import INDEX_FILE

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_INDEX_GLOBALS = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # name -> torch.layout, from a fixed table
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: where the writer wrote
    ("pathlib._local", "PosixPath"),  # the same class, as Python 3.13 names it
}
JSON_KEY = "_json"  # ``<section>._json``: a section's non-tensor values, as a uint8 tensor
_TUPLE, _SET, _ITEMS = "__tuple__", "__set__", "__items__"


class CheckpointRefused(ValueError):
    """A checkpoint file holds something a reader does not build; nothing of it was used."""


class IndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` index: only the classes such an index is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which no DCP index holds")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference, which no DCP index holds")


def read_index(path: Path, files: dict, allow_pickled: bool) -> Metadata:
    """DCP's index at ``path`` (a ``.metadata``), checked against meta.json's ``files``.

    ``allow_pickled``: format 3, whose non-tensor entries are pickles (loaded weights-only).
    Raises :class:`CheckpointRefused` naming the file and what it would have built or read.
    """
    try:
        with open(path, "rb") as handle:
            metadata = IndexUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointRefused(f"{path} refused: {exc} (a crafted or foreign file)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged stream fails in many ways
        raise ValueError(f"{path} cannot be read: {type(exc).__name__}: {exc}") from None
    _check_index(path, metadata, files, allow_pickled)
    return metadata


def _check_index(path: Path, metadata: Any, files: dict, allow_pickled: bool) -> None:
    """The index points only at recorded files, untransformed; no pickles unless allowed."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointRefused(f"{path} refused: not a DCP index ({type(metadata).__name__})")
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata) and not allow_pickled:
            raise CheckpointRefused(
                f"{path} refused: entry {key!r} is a pickled object, which a format-4 "
                "checkpoint never holds (a crafted or foreign file)"
            )
    for index, info in (metadata.storage_data or {}).items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name not in files or "/" in name:
            raise CheckpointRefused(
                f"{path} refused: entry {getattr(index, 'fqn', index)!r} points at "
                f"{name!r}, which meta.json does not record"
            )
        if getattr(info, "transform_descriptors", None):
            raise CheckpointRefused(
                f"{path} refused: entry {index.fqn!r} asks for storage transforms "
                f"{info.transform_descriptors!r}, which dist_cosface never writes"
            )


class SafeReader(FileSystemReader):
    """DCP's file reader with the index read by :func:`read_index` (once, then reused)."""

    def __init__(self, ckpt: Path, files: dict, allow_pickled: bool) -> None:
        super().__init__(str(ckpt))
        self.ckpt, self.files, self.allow_pickled = Path(ckpt), files, allow_pickled
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            metadata = read_index(self.ckpt / INDEX_FILE, self.files, self.allow_pickled)
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata

    def read_data(self, plan, planner):
        try:  # tensors: torch.load(weights_only=True) inside DCP
            return super().read_data(plan, planner)
        except pickle.UnpicklingError as exc:
            raise CheckpointRefused(f"{self.ckpt}: a tensor refused: {refusal(exc)}") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with pickled (format-3) entries loaded weights-only."""

    def __init__(self, ckpt: Path) -> None:
        super().__init__()
        self.ckpt = Path(ckpt)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointRefused(f"{self.ckpt}: entry {fqn!r} refused: {refusal(exc)}") from None
        set_element(self.original_state_dict, self.mappings[fqn], loaded)


def refusal(exc: pickle.UnpicklingError) -> str:
    """torch's many-line weights-only refusal, as one clause naming what the pickle wanted."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    what = f"it names {found.group(1)}" if found else str(exc).strip().splitlines()[0]
    return f"{what}, which a weights-only load does not build (a crafted or foreign file)"


def encode_plain(tree: dict) -> dict:
    """``tree`` with each top-level section's non-tensor values moved into one JSON document,
    stored as a uint8 tensor under ``<section>._json`` (DCP then writes only tensors)."""
    out = {}
    for name, section in tree.items():
        if not isinstance(section, dict):
            out[name] = section
            continue
        tensors, plain = _split(section, name)
        if plain is not None:
            tensors[JSON_KEY] = _to_blob(plain)
        out[name] = tensors
    return out


def decode_plain(tree: dict) -> dict:
    """The inverse of :func:`encode_plain` (a tree without ``_json`` entries is unchanged)."""
    out = {}
    for name, section in tree.items():
        if isinstance(section, dict) and JSON_KEY in section:
            section = dict(section)
            plain = from_blob(section.pop(JSON_KEY), name)
            section = _merge(section, plain)
        out[name] = section
    return out


def fit_blobs(tree: dict, metadata: Metadata) -> dict:
    """``tree`` (an encoded template) with each ``_json`` tensor sized as the checkpoint's."""
    stored = metadata.state_dict_metadata
    for name, section in tree.items():
        key = f"{name}.{JSON_KEY}"
        if isinstance(section, dict) and JSON_KEY in section and key in stored:
            section[JSON_KEY] = torch.empty(stored[key].size, dtype=torch.uint8)
    return tree


def _split(node: dict, path: str) -> tuple[dict, Any]:
    """(tensors of ``node`` as a tree, everything else as a JSON-able tree or None)."""
    tensors: dict = {}
    plain: dict = {}
    for key, value in node.items():
        where = f"{path}.{key}"
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and _has_tensor(value):
            sub_tensors, sub_plain = _split(value, where)
            tensors[key] = sub_tensors
            if sub_plain is not None:
                plain[key] = sub_plain
        else:
            plain[key] = _to_json(value, where)
    return tensors, (plain if plain else None)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _to_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; tuples and dicts with non-string keys tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, where) for v in value]}
    if isinstance(value, (set, frozenset)):
        try:  # sorted where the members allow: the same set, the same bytes
            members = sorted(value)
        except TypeError:
            members = list(value)
        return {_SET: [_to_json(v, where) for v in members]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {_TUPLE, _SET, _ITEMS} & value.keys():
            return {k: _to_json(v, f"{where}.{k}") for k, v in value.items()}
        return {_ITEMS: [[_to_json(k, where), _to_json(v, where)] for k, v in value.items()]}
    raise TypeError(
        f"checkpoint value {where}: a {type(value).__name__} is neither a tensor nor plain "
        "data (numbers, strings, lists, tuples, sets, dicts), so it cannot be stored without "
        "pickle"
    )


def _from_json_object(obj: dict) -> Any:
    if obj.keys() == {_TUPLE}:
        return tuple(obj[_TUPLE])
    if obj.keys() == {_SET}:
        return set(obj[_SET])
    if obj.keys() == {_ITEMS}:
        return {k: v for k, v in obj[_ITEMS]}
    return obj


def _to_blob(plain: Any) -> torch.Tensor:
    data = bytearray(json.dumps(plain, separators=(",", ":")).encode())
    return torch.frombuffer(data, dtype=torch.uint8).clone()


def from_blob(blob: torch.Tensor, where: str) -> Any:
    """The value :func:`encode_plain` stored in ``blob``."""
    try:
        text = blob.numpy().tobytes().decode()
        return json.loads(text, object_hook=_from_json_object)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"checkpoint entry {where}.{JSON_KEY} is not valid JSON: {exc}") from None


def _merge(tensors: dict, plain: dict) -> dict:
    out = dict(tensors)
    for key, value in plain.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
