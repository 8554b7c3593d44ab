"""The one rule for deriving seeds: a stable 63-bit seed from several integers.

Loaders (per epoch, rank, batch), Partial FC sampling (per step, micro-step, shard) and the
classifier's weight initialisation (per block) all seed their generators through
:func:`stable_seed`, so a run resumed in another process draws exactly what the original
drew. Python's ``hash()`` is not used: it is salted per process for strings, and its tuple
mixing is an interpreter detail.
"""

from __future__ import annotations

_MASK64 = 0xFFFFFFFFFFFFFFFF


def stable_seed(*values: int) -> int:
    """A 63-bit seed from ``values`` (any ints, negatives taken modulo 2**64); same everywhere."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
