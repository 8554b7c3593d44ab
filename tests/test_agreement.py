"""``dist_cosface.agreement``: ballots cast and read by name, the object votes' rule (the
failing rank raises its own error, the others one naming it), in one process and on three real
gloo ranks, where every vote runs on the group it is given (a sub-group of ranks 1 and 2 as
well as the whole world). Its users are tested across ranks too: the trainer's votes
(tests/engine/test_trainer_steps.py), the head's input check (test_classifier_inputs.py), the
evaluation, the data checks (test_data_integrity.py) and the checkpoints (tests/engine/)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_cosface.agreement import (
    Ballot,
    first_problem,
    gather_objects,
    raise_on_any_rank,
    run_agreed,
)
from dist_cosface.distributed import DistContext, GroupMember
from tests.multiproc import run_ranks

CPU = torch.device("cpu")


def test_a_ballot_travels_in_its_order_and_reads_back_by_name():
    ballot = Ballot("stop", "count", "failed")
    device_count = torch.tensor(3, dtype=torch.long)  # a device-side vote: no host sync
    cast = ballot.cast(CPU, failed=True, stop=False, count=device_count)
    assert cast.dtype == torch.float64 and cast.tolist() == [0.0, 3.0, 1.0]
    riding = torch.cat([torch.tensor([7.5], dtype=torch.float64), cast])  # the caller's payload
    assert ballot.read(riding[1:]) == {"stop": 0.0, "count": 3.0, "failed": 1.0}
    rows = torch.stack([cast, ballot.cast(CPU, stop=1, count=0, failed=0)])
    assert ballot.read_rows(rows) == [
        {"stop": 0.0, "count": 3.0, "failed": 1.0},
        {"stop": 1.0, "count": 0.0, "failed": 0.0},
    ]
    assert ballot.tally(CPU, None, stop=True, count=2, failed=False) == {
        "stop": 1.0,
        "count": 2.0,
        "failed": 0.0,
    }


def test_a_ballot_refuses_votes_it_does_not_name():
    with pytest.raises(ValueError, match="distinct names"):
        Ballot("stop", "stop")
    ballot = Ballot("stop", "failed")
    with pytest.raises(ValueError, match=r"votes \['stop'\] do not match the ballot"):
        ballot.cast(CPU, stop=1)
    with pytest.raises(ValueError, match="3 values for the ballot"):
        ballot.read([1.0, 0.0, 0.0])


def test_object_votes_in_one_process_are_the_process_own():
    assert gather_objects({"a": 1}, None) == [{"a": 1}]
    assert first_problem(None, None) is None and first_problem("full", None) == "full"
    raise_on_any_rank(None, None)  # nobody failed: nothing raised
    with pytest.raises(KeyError, match="x"):
        raise_on_any_rank(KeyError("x"), None)
    assert run_agreed(lambda: 41 + 1, None) == 42
    with pytest.raises(ZeroDivisionError):
        run_agreed(lambda: 1 / 0, None)


def test_a_rank_place_in_a_group_is_one_description():
    assert GroupMember.of(None) == GroupMember(rank=0, world_size=1, group=None)
    ctx = DistContext(rank=2, world_size=4, local_rank=0)
    assert isinstance(ctx, GroupMember) and not ctx.is_main and not ctx.is_distributed


def _outcome(fn) -> str:
    """What ``fn`` did on this rank, as text the parent can compare."""
    try:
        return f"returned {fn()}"
    except Exception as exc:  # noqa: BLE001 - the test reads which rank raised what
        return f"{type(exc).__name__}: {exc}"


def _fails_on(rank: int, bad: int) -> int:
    if rank == bad:
        raise KeyError(f"missing file on rank {rank}")
    return rank * 10


def _vote_on_groups(rank: int, world: int) -> dict:
    """Every agreement helper over the world, then over the sub-group {1, 2} (every rank
    builds it, a collective; only its members vote there)."""
    ballot = Ballot("stop", "count")
    world_group = dist.group.WORLD
    out = {
        "member": GroupMember.of(world_group),
        "tally": ballot.tally(CPU, world_group, stop=rank == 1, count=rank + 1),
        # a cast ballot riding in the caller's own collective, after its payload
        "riding": ballot.read(_ride(ballot.cast(CPU, stop=0, count=2**rank), world_group)[1:]),
        "rows": _gathered_rows(ballot, rank, world_group),
        "objects": gather_objects({"rank": rank}, world_group),
        "first": first_problem(None if rank == 0 else f"disk full on {rank}", world_group),
        "agreed": _outcome(lambda: run_agreed(lambda: _fails_on(rank, 2), world_group)),
        "clean": _outcome(lambda: run_agreed(lambda: _fails_on(rank, -1), world_group)),
    }
    sub = dist.new_group([1, 2])
    if rank in (1, 2):
        out["sub_member"] = GroupMember.of(sub)
        out["sub_tally"] = ballot.tally(CPU, sub, stop=True, count=rank)
        out["sub_agreed"] = _outcome(lambda: run_agreed(lambda: _fails_on(rank, 1), sub))
    return {k: (v.rank, v.world_size) if isinstance(v, GroupMember) else v for k, v in out.items()}


def _ride(cast: torch.Tensor, group) -> torch.Tensor:
    packed = torch.cat([torch.tensor([0.5], dtype=torch.float64), cast])
    dist.all_reduce(packed, group=group)
    return packed


def _gathered_rows(ballot: Ballot, rank: int, group) -> list[dict[str, float]]:
    rows = [
        torch.empty(len(ballot), dtype=torch.float64) for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(rows, ballot.cast(CPU, stop=rank == 2, count=rank), group=group)
    return ballot.read_rows(torch.stack(rows))


@pytest.mark.multiproc
def test_ranks_agree_over_the_group_they_are_given():
    results = run_ranks(3, _vote_on_groups)
    for rank, got in enumerate(results):
        assert got["member"] == (rank, 3)
        assert got["tally"] == {"stop": 1.0, "count": 6.0}  # 1 + 2 + 3
        assert got["riding"] == {"stop": 0.0, "count": 7.0}  # 1 + 2 + 4
        assert got["rows"] == [{"stop": float(r == 2), "count": float(r)} for r in range(3)]
        assert got["objects"] == [{"rank": r} for r in range(3)]
        assert got["first"] == "disk full on 1"  # the lowest failing rank's, everywhere
        assert got["clean"] == f"returned {rank * 10}"
    own = "KeyError: 'missing file on rank 2'"
    assert [r["agreed"] for r in results] == [
        f"ValueError: rank 2 failed: {own}",
        f"ValueError: rank 2 failed: {own}",
        own,
    ]
    assert "sub_member" not in results[0]  # rank 0 is outside {1, 2} and took no part
    for rank in (1, 2):
        assert results[rank]["sub_member"] == (rank - 1, 2)
        assert results[rank]["sub_tally"] == {"stop": 2.0, "count": 3.0}
    assert results[1]["sub_agreed"] == "KeyError: 'missing file on rank 1'"
    # the sub-group's own rank numbering: global rank 1 is rank 0 there
    assert (
        results[2]["sub_agreed"] == "ValueError: rank 0 failed: KeyError: 'missing file on rank 1'"
    )
