"""One training run over the processes torchrun starts: the process group, who does what, and how
the ranks agree.

    torchrun --nproc_per_node 2 -m simplegpt train --data my.txt --grad_accum_steps 4

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (and MASTER_ADDR/PORT) for each
process it starts; `setup` sees them and joins the process group with torch.distributed
(NCCL on CUDA, each process on cuda:LOCAL_RANK; gloo on CPUs), with a bounded timeout so that a
collective waiting for a dead peer raises instead of hanging. A plain `simplegpt train` has none of
these variables and gets no process group: `setup` returns None and nothing changes.

The global-batch rule (docs/distributed.md): batch_size x grad_accum_steps sequences make one
optimizer step whatever the world size. The micro-batches of a step are defined globally (every
rank draws the same sampler with the same seed) and rank r computes micro-batches r, r + N, r + 2N, ...
of them (N = WORLD_SIZE, which must divide grad_accum_steps). Each rank scales a micro-batch's mean loss
by N x its share of the step's loss tokens (every rank draws every micro-batch, so every rank knows the
step's count), and DDP's all-reduce averages the ranks' gradients (divides by N), so the gradient is
the mean over all the step's loss tokens: the one a single process accumulates.

Rank 0 alone writes the run folder (lock, config, metrics, checkpoints, samples, plots) and prints;
the others wait for it at `barrier`. Errors in the setup are exchanged (`agree`): when one rank
cannot start, every rank stops, and only the failing one says why.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, SimpleGPTError
from . import TrainingError

T = TypeVar("T")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class PeerError(TrainingError):
    """The run cannot start because a rank failed. On rank 0 the message names the failing rank and
    its error; on the other ranks it is `quiet` (the CLI prints nothing: rank 0 says it once)."""

    def __init__(self, message: str, exit_code: int = 1, quiet: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.quiet = quiet


@dataclass
class Dist:
    """This process's place in the run: rank (0..world_size-1), local_rank on its node, the device it
    computes on, and whether it created the process group (and so destroys it at the end)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    owns_group: bool
    timeout_s: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group (when setup made it)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK/WORLD_SIZE/LOCAL_RANK)."""
    return all(v in os.environ for v in LAUNCH_VARIABLES)


def setup(device: torch.device, timeout_s: int) -> Dist | None:
    """Join the process group torchrun's environment describes; None outside torchrun.

    device: the run's resolved device (cpu -> gloo; cuda -> NCCL on cuda:LOCAL_RANK).
    timeout_s: seconds any collective waits for the other ranks before it raises.
    Reuses a process group the caller already initialized. ConfigError for a launch environment
    that cannot work (a LOCAL_RANK this machine has no GPU for, a device type without a backend)."""
    owns = not dist.is_initialized()
    if owns and not launched():
        return None
    try:
        if owns:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as e:
        raise ConfigError(f"the torchrun variables RANK/WORLD_SIZE/LOCAL_RANK are not integers ({e})") from None
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                              "start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"torchrun training runs on CUDA (NCCL) or on CPUs (gloo), not on {device.type}; "
                          "use --device cpu or cuda")
    if owns:
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        # torch's own env:// store, with the keys of each attempt apart: torchrun --max-restarts keeps one
        # store for every attempt, and the restarted ranks would otherwise read the dead ranks' addresses.
        try:
            store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"simplegpt/attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
        except (RuntimeError, ValueError, dist.DistError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise LostPeer(f"rank {rank}: could not join the other {world - 1} processes of the run at {where} "
                           f"within dist_timeout {timeout_s} s ({backend}): {detail[:300]}") from None
    return Dist(rank, world, local_rank, local_world, backend, device, owns, timeout_s)


def check_accumulation(grad_accum_steps: int, world_size: int) -> None:
    """ConfigError unless world_size divides grad_accum_steps (the global-batch rule)."""
    if grad_accum_steps % world_size:
        raise ConfigError(f"grad_accum_steps {grad_accum_steps} must be divisible by the world size {world_size}: "
                          "each rank computes grad_accum_steps / world size micro-batches of every step; use "
                          f"--grad_accum_steps {world_size * max(1, round(grad_accum_steps / world_size))} "
                          "(and adjust batch_size for the same global batch) or another number of processes")


def threads_per_rank(local_world_size: int) -> int:
    """CPU threads for one of local_world_size processes on this node: its share of the cores it may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size)


def agree(d: Dist | None, fn: Callable[[], T]) -> T:
    """fn() on every rank, then an exchange (a collective) of who failed. When no rank failed, fn's
    result. Otherwise every rank raises: rank 0 its own exception, or a PeerError naming the first
    rank that failed and its message; another rank a quiet PeerError (the CLI prints nothing for it:
    rank 0 says it once), or its own exception when that is a bug (which keeps its traceback).
    No rank is left waiting in a later collective for one that stopped."""
    if d is None:
        return fn()
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 (re-raised below, after the others heard of it)
        error = e
    mine = None if error is None else (type(error).__name__, str(error).splitlines()[0] if str(error) else "",
                                       getattr(error, "exit_code", 1))
    everyone: list[Any] = [None] * d.world_size
    try:
        dist.all_gather_object(everyone, mine)
    except Exception as e:  # a peer died before it answered
        if error is not None:
            raise error
        raise lost_peer(d, e) from None
    failed = [(r, f) for r, f in enumerate(everyone) if f is not None]
    if not failed:
        return result
    r, (kind, message, code) = failed[0]
    if error is not None and (d.is_main or not isinstance(error, SimpleGPTError)):
        raise error  # rank 0 says its own line; a bug keeps its traceback on every rank
    raise PeerError(f"rank {r} could not start ({kind}: {message})", exit_code=code, quiet=not d.is_main)


class LostPeer(TrainingError):
    """A collective failed: another rank died, or did not answer within dist_timeout. Every surviving
    rank says so (the dead one cannot)."""


def lost_peer(d: Dist, e: BaseException) -> LostPeer:
    """The error of a collective that failed: a peer died, or did not answer within the timeout."""
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return LostPeer(f"rank {d.rank}: lost the other processes of the run (a rank died, or did not answer "
                         f"within dist_timeout {d.timeout_s} s): {detail[:300]}")


@contextlib.contextmanager
def collectives(d: Dist | None) -> Iterator[None]:
    """Inside it, a failed collective (DDP's gradient all-reduce in a backward pass) becomes lost_peer's
    one line; other errors pass as they are."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        text = str(e).lower()
        if d is None or not (isinstance(e, dist.DistError) or "gloo" in text or "nccl" in text):
            raise
        raise lost_peer(d, e) from None


def all_reduce_sum(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """The sum over the ranks of each value (float64). TrainingError when a peer is lost."""
    t = torch.tensor(values, dtype=torch.float64, device=device if d.backend == "nccl" else "cpu")
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except Exception as e:
        raise lost_peer(d, e) from None
    return t.tolist()


def barrier(d: Dist | None) -> None:
    """Wait for every rank (rank 0 writing a checkpoint, the others here). TrainingError when a peer is lost."""
    if d is None:
        return
    try:
        dist.barrier()
    except Exception as e:
        raise lost_peer(d, e) from None


def gather_objects(d: Dist, obj: Any) -> list[Any]:
    """obj of every rank, in rank order, on every rank. TrainingError when a peer is lost."""
    out: list[Any] = [None] * d.world_size
    try:
        dist.all_gather_object(out, obj)
    except Exception as e:
        raise lost_peer(d, e) from None
    return out


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Rank 0's obj on every rank. TrainingError when a peer is lost."""
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as e:
        raise lost_peer(d, e) from None
    return box[0]
