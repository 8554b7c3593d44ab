"""insightface ``.bin`` verification sets, read without letting the pickle run code.

A ``.bin`` is a pickle of ``(encoded_images, issame)`` where pair ``i`` is images ``2i`` and
``2i + 1``. It is parsed with an unpickler that refuses every global; the single exception is
the ``_codecs.encode`` call that Python 3 emits for ``bytes`` under pickle protocols 0-2, which
is replaced by a latin-1-only re-implementation.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from dist_cosface.eval.verification_set import VerificationSet


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 protocol <= 2 pickles of ``bytes`` call: ``_codecs.encode(s, 'latin1')``."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    if not isinstance(text, str):
        raise pickle.UnpicklingError("refusing _codecs.encode of a non-string")
    return text.encode("latin1")


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} (only plain data is accepted)"
        )


def _as_bool(value: object, path: Path, index: int) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValueError(f"{path}: issame[{index}] is {value!r}, expected a bool")


def load_bin(path: str | Path) -> VerificationSet:
    """Read an insightface ``.bin`` verification set without executing pickle code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"verification set not found: {path}")
    try:
        with path.open("rb") as f:
            # encoding="bytes": Python 2 pickles store encoded images as str, keep them bytes.
            data = _DataOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: unsafe or invalid .bin pickle: {exc}") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"{path}: corrupt .bin pickle: {exc}") from exc
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair")
    images, issame = data
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: images and issame must be lists")
    for i, item in enumerate(images):
        if not isinstance(item, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is {type(item).__name__}, expected bytes")
    flags = [_as_bool(v, path, i) for i, v in enumerate(issame)]
    return VerificationSet(path.stem, [bytes(b) for b in images], flags, str(path))


def write_bin(path: str | Path, images: list[bytes], issame: list[bool]) -> Path:
    """Write an insightface-compatible ``.bin`` (encoded image bytes, pair flags)."""
    path = Path(path)
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: need two images per pair, got {len(images)}/{len(issame)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump((list(images), [bool(s) for s in issame]), f, protocol=4)
    tmp.replace(path)
    return path
