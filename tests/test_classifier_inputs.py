"""classifier/inputs.py: the head's input checks and the errors they raise (one process; the
cross-rank agreement on a real group is in tests/test_classifier_dist.py)."""

from __future__ import annotations

import pytest
import torch

from dist_cosface.classifier.comm import Comm
from dist_cosface.classifier.inputs import agree_on_batch, check_batch, input_error

GOOD = (torch.zeros(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    "embeddings,labels,error,message",
    [
        (torch.zeros(3, 4, dtype=torch.long), GOOD[1], TypeError, "embeddings must be a floating"),
        ([[0.0] * 4], GOOD[1], TypeError, "embeddings must be a floating tensor, got list"),
        (GOOD[0], GOOD[1].int(), TypeError, "labels must be an int64 tensor, got a torch.int32"),
        (torch.zeros(3, 5), GOOD[1], ValueError, "embeddings must have shape [B, 4], got [3, 5]"),
        (GOOD[0], GOOD[1][:2], ValueError, "labels must have shape [3] to match the embeddings"),
    ],
)
def test_input_errors_are_exceptions_naming_the_values(embeddings, labels, error, message):
    found = input_error(embeddings, labels, 4)
    assert type(found) is error and str(found).startswith(message), found
    with pytest.raises(error) as raised:
        check_batch(embeddings, labels, 4, 10)
    assert str(raised.value) == str(found)
    with pytest.raises(error) as agreed:  # without a group: the same error, rank-prefixed
        agree_on_batch(Comm(None), embeddings, labels, 4, 10, torch.device("cpu"))
    assert type(agreed.value) is error and str(agreed.value) == f"rank 0: {found}"


def test_labels_out_of_range_and_good_batches():
    assert input_error(*GOOD, 4) is None
    check_batch(*GOOD, 4, 10)
    assert agree_on_batch(Comm(None), *GOOD, 4, 10, torch.device("cpu")) == [3]
    labels = torch.tensor([12, -1, 12])
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 10\), got \[-1, 12\]$"):
        check_batch(GOOD[0], labels, 4, 10)
    with pytest.raises(ValueError, match=r"^rank 0: labels must be in \[0, 10\), got \[-1, 12\]$"):
        agree_on_batch(Comm(None), GOOD[0], labels, 4, 10, torch.device("cpu"))
