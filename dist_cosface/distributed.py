"""The one place that builds process groups.

``init_distributed`` reads the torchrun/deepspeed environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, ...) and returns a :class:`DistContext` that the rest of the code receives
explicitly. Every collective in the project takes its group from this context (or from a
group the caller was given explicitly); nothing reads the default group implicitly. A rank's
place in a group is a :class:`GroupMember`; how the ranks agree on a decision is
``dist_cosface.agreement``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistConfig:
    """Process-group settings (``dist.*`` in YAML)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, else gloo
    timeout_s: int = 600  # a rank that stops answering fails the job after this long
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class GroupMember:
    """A process's place in a process group: its rank there and the group's size.

    THE description of "who am I in which group" (the trainer's ``DistContext`` is one, the
    classifier's and the evaluation's groups get one from :meth:`of`); ``group`` None means a
    single process without torch.distributed.
    """

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> GroupMember:
        """This process's place in ``group`` (rank 0 of 1 without one)."""
        if group is None:
            return cls()
        return cls(rank=dist.get_rank(group), world_size=dist.get_world_size(group), group=group)

    @property
    def is_distributed(self) -> bool:
        return self.group is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class DistContext(GroupMember):
    """Who this process is, which group it talks to, where it runs."""

    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    device: torch.device = torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from exc


def _pick_device(cfg: DistConfig, local_rank: int) -> torch.device:
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ValueError("dist.device='cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: DistConfig | None = None) -> DistContext:
    """Initialize (or adopt) the default process group from the launcher's environment.

    With no WORLD_SIZE in the environment (plain ``python``), returns a single-process context
    and leaves torch.distributed uninitialized.
    """
    cfg = cfg or DistConfig()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    node_rank = _env_int("GROUP_RANK", rank // max(local_world, 1))
    device = _pick_device(cfg, local_rank)
    if world_size == 1 and not dist.is_initialized():
        return DistContext(device=device)
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        _warn_shared_agent_store()
        with _exit_if_stuck(cfg.timeout_s, "building the process group"):
            dist.init_process_group(
                backend=backend,
                timeout=datetime.timedelta(seconds=cfg.timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        device=device,
        group=dist.group.WORLD,
    )


def _warn_shared_agent_store() -> None:
    """torchrun shares its rendezvous TCPStore with the workers of every restart round and
    never clears it, so a restarted group can read the dead round's gloo/NCCL addresses and
    fail or hang (seen: 2 of 3 restarts). The launchers set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1:
    then each round's rank 0 serves a fresh store on a fresh port (docs/launching.md)."""
    restarts = _env_int("TORCHELASTIC_MAX_RESTARTS", 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning(
            "torchrun --max-restarts=%d with the shared agent store: restarts may hang or fail "
            "in process-group construction; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(launch/torchrun.sh does)",
            restarts,
        )


@contextlib.contextmanager
def _exit_if_stuck(seconds: float, what: str):
    """Hard-exit the process when the block runs longer than ``seconds``.

    Group construction does not always honour its timeout (a connect to a stale address can
    retry for much longer); exiting lets the launcher restart or fail the job instead.
    """

    def expire() -> None:
        log.error("%s took over %.0f s (dist.timeout_s): exiting", what, seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def context_from_group(group: dist.ProcessGroup | None, device: torch.device) -> DistContext:
    """A context over an existing group (tests and library users who built their own)."""
    if group is None:
        return DistContext(device=device)
    return DistContext(
        rank=dist.get_rank(group),
        world_size=dist.get_world_size(group),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", dist.get_world_size(group)),
        device=device,
        group=group,
    )


def build_checkpoint_group(ctx: DistContext) -> dist.ProcessGroup | None:
    """A new gloo group over ``ctx.group``'s ranks for checkpoint I/O (None without a group).

    An asynchronous checkpoint coordinates its writers from a background thread while the
    training thread runs collectives on ``ctx.group``; two threads must not share one group,
    and checkpoints are staged in host memory, which gloo moves whatever the training backend.
    Every rank of ``ctx.group`` calls this at the same point (the checkpointer's construction).
    """
    if ctx.group is None:
        return None
    ranks = dist.get_process_group_ranks(ctx.group)
    # Over the whole world, a numbered name: a name hashed from the ranks and the number of
    # live groups would repeat after ``Checkpointer.close`` destroyed the previous checkpoint
    # group, and the new group would then read the old one's addresses from the store.
    local = len(ranks) != dist.get_world_size()
    return dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=local)


def shutdown(ctx: DistContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
