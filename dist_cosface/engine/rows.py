"""Row arithmetic for classifier shards: merging and splitting shard payloads.

A shard payload is ``{"weight": [rows, D], "optim": optimizer.state_dict()}``. Per-row
optimizer state tensors have leading dimension ``rows`` (the classifier's contract), so they
are cut and joined along with the weight; any other state (scalars, shared tensors) is taken
from the first shard involved.
"""

from __future__ import annotations

import torch


def _is_row_tensor(value, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows


def slice_payload(payload: dict, lo: int, hi: int) -> dict:
    """Rows ``[lo, hi)`` (shard-local indices) of one shard payload."""
    rows = payload["weight"].shape[0]
    state = {
        idx: {k: (v[lo:hi] if _is_row_tensor(v, rows) else v) for k, v in per_param.items()}
        for idx, per_param in payload["optim"].get("state", {}).items()
    }
    optim = {"state": state, "param_groups": payload["optim"]["param_groups"]}
    return {"weight": payload["weight"][lo:hi], "optim": optim}


def concat_payloads(parts: list[dict]) -> dict:
    """Join consecutive row blocks into one payload."""
    if not parts:
        raise ValueError("no shard rows to concatenate")
    weight = torch.cat([p["weight"] for p in parts])
    first_state = parts[0]["optim"].get("state", {})
    state = {}
    for idx, per_param in first_state.items():
        if not all(idx in p["optim"].get("state", {}) for p in parts):
            continue  # a shard that never stepped has no state: restart this param's state
        merged = {}
        for key, value in per_param.items():
            if _is_row_tensor(value, parts[0]["weight"].shape[0]):
                merged[key] = torch.cat([p["optim"]["state"][idx][key] for p in parts])
            else:
                merged[key] = value
        state[idx] = merged
    return {
        "weight": weight,
        "optim": {"state": state, "param_groups": parts[0]["optim"]["param_groups"]},
    }


def gather_rows(shards: list[tuple[int, int, object]], start: int, count: int) -> dict:
    """Rows ``[start, start + count)`` of the full matrix from shards ``(start, rows, load)``.

    ``load()`` returns that shard's payload; it is only called for shards that overlap, so
    a rank reading a resharded checkpoint touches only the old files it needs.
    """
    parts = []
    for shard_start, rows, load in sorted(shards, key=lambda s: s[0]):
        lo, hi = max(start, shard_start), min(start + count, shard_start + rows)
        if lo < hi:
            parts.append(slice_payload(load(), lo - shard_start, hi - shard_start))
    got = sum(p["weight"].shape[0] for p in parts)
    if got != count:
        raise ValueError(f"shards cover {got} of the {count} rows starting at class {start}")
    return concat_payloads(parts)
