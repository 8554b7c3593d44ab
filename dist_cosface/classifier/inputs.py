"""The head's input checks, and how the ranks of its group agree on them.

A rank whose embeddings or labels are bad must not simply raise: its peers would wait forever
in the head's next collective. :func:`agree_on_batch` is therefore the first collective of
every forward: each rank checks its own batch, one all-gather of a ``[1, 3]`` row per rank
(an ``agreement.Ballot``: batch size, bad-input flag, count of labels outside ``[0, C)``)
tells every rank about the others, and then all ranks raise together: the faulty rank the
error naming its values, the others a :class:`PeerInputError` naming the faulty ranks. When
every batch is good the gathered batch sizes are what the embedding all-gather needs anyway,
so the check costs no extra collective. The label count stays on the device until that
all-gather: one host sync.
"""

from __future__ import annotations

import torch

from dist_cosface.agreement import Ballot
from dist_cosface.classifier.comm import Comm

# every rank's row of the head's input all-gather (``agreement.Ballot``, gathered per rank)
_BATCH_VOTES = Ballot("batch_size", "bad_input", "bad_labels")


class PeerInputError(ValueError):
    """Raised on the ranks whose own batch was fine when another rank's batch was not."""


def input_error(embeddings: object, labels: object, width: int) -> TypeError | ValueError | None:
    """The first problem with the types and shapes of one rank's batch, or None."""
    if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
        return TypeError(f"embeddings must be a floating tensor, got {_describe(embeddings)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        return TypeError(f"labels must be an int64 tensor, got {_describe(labels)}")
    if embeddings.dim() != 2 or embeddings.shape[1] != width:
        return ValueError(f"embeddings must have shape [B, {width}], got {list(embeddings.shape)}")
    if labels.shape != embeddings.shape[:1]:
        return ValueError(
            f"labels must have shape [{embeddings.shape[0]}] to match the embeddings, "
            f"got {list(labels.shape)}"
        )
    return None


def out_of_range(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Bool mask of the labels outside ``[0, num_classes)``."""
    return (labels < 0) | (labels >= num_classes)


def label_range_error(labels: torch.Tensor, num_classes: int) -> ValueError:
    """The error naming (up to 8 of) the labels outside ``[0, num_classes)``."""
    wrong = labels[out_of_range(labels, num_classes)].unique()[:8].tolist()
    return ValueError(f"labels must be in [0, {num_classes}), got {wrong}")


def check_batch(embeddings: object, labels: object, width: int, num_classes: int) -> None:
    """Raise this process's first input problem (one process: no peers to agree with)."""
    error = input_error(embeddings, labels, width)
    if error is not None:
        raise error
    if bool(out_of_range(labels, num_classes).any()):
        raise label_range_error(labels, num_classes)


def agree_on_batch(
    comm: Comm,
    embeddings: object,
    labels: object,
    width: int,
    num_classes: int,
    device: torch.device,
) -> list[int]:
    """Every rank's batch size, in rank order; raises on every rank when any batch is bad.

    One all-gather on ``comm``'s group (a no-op without a group). The faulty rank raises its
    own TypeError / ValueError prefixed with ``rank <r>:``; the others raise
    :class:`PeerInputError`. No rank is left waiting in a collective either way.
    """
    error = input_error(embeddings, labels, width)
    batch, bad_labels = 0, torch.zeros((), dtype=torch.long, device=device)
    if error is None:
        batch = embeddings.shape[0]
        bad_labels = out_of_range(labels, num_classes).sum().to(device)
    votes = _BATCH_VOTES.cast(
        device, batch_size=batch, bad_input=error is not None, bad_labels=bad_labels
    )
    rows = _BATCH_VOTES.read_rows(comm.all_gather(votes[None]))  # [world, 3]: one host sync
    bad_ranks = [r for r, row in enumerate(rows) if row["bad_input"] or row["bad_labels"]]
    if not bad_ranks:
        return [int(row["batch_size"]) for row in rows]
    rank = comm.rank
    if error is not None:
        raise type(error)(f"rank {rank}: {error}")
    if rank in bad_ranks:
        raise ValueError(f"rank {rank}: {label_range_error(labels, num_classes)}")
    raise PeerInputError(f"rank(s) {bad_ranks} passed invalid embeddings/labels to the head")


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {list(obj.shape)}"
    return type(obj).__name__
