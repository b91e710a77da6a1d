"""Running across processes, GPUs and machines under torchrun.

torchrun starts one process per GPU and tells each who it is through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT). `init()` reads that, starts
`torch.distributed` when there is more than one process (NCCL on CUDA, each process on
`cuda:LOCAL_RANK`; gloo on CPU) and returns a `DistInfo`. Without torchrun (or with one process)
everything here is a no-op, so the same code runs alone.

The work itself needs no communication: each rank takes a deterministic share (`shard`), writes
its own files into a shared folder, and the ranks only meet at barriers (settings agreed before,
everyone done before rank 0 aggregates). Barriers and small broadcasts go over a gloo group
even on GPUs: a rank may wait hours at the final barrier for a slower one, which should cost no
GPU and must not trip NCCL's watchdog. The group timeout is long for the same reason
(ROME_FAST_DIST_TIMEOUT_MIN, default 2 days).

For tests only, ROME_FAST_FAIL_RANK / ROME_FAST_FAIL_AFTER make one rank fail on purpose (see
`failure_hook`; with ROME_FAST_FAIL_KILL=1 it is killed with SIGKILL instead)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")

FAIL_RANK_ENV = "ROME_FAST_FAIL_RANK"
FAIL_AFTER_ENV = "ROME_FAST_FAIL_AFTER"
FAIL_KILL_ENV = "ROME_FAST_FAIL_KILL"
TIMEOUT_ENV = "ROME_FAST_DIST_TIMEOUT_MIN"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: str = "cpu"     # this rank's device: cuda:LOCAL_RANK when CUDA is present

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_info: Optional[DistInfo] = None
_group = None  # the gloo group for barriers/broadcasts (None: the default group, or single process)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def env_info() -> DistInfo:
    """Who this process is according to torchrun's environment (rank 0 of 1 without it); starts nothing."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    if not (0 <= rank < world) or not (0 <= local_rank < max(local_world, 1)):
        raise ValueError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
                         f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return DistInfo(rank, world, local_rank, local_world, device)


def init(timeout_min: Optional[float] = None) -> DistInfo:
    """Start the process group when WORLD_SIZE > 1 (idempotent) and return this rank's info."""
    global _info, _group
    if _info is not None:
        return _info
    info = env_info()
    if info.distributed:
        import torch.distributed as dist
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        timeout = timedelta(minutes=timeout_min if timeout_min is not None
                            else float(os.environ.get(TIMEOUT_ENV, 2 * 24 * 60)))
        if info.device.startswith("cuda"):
            n = torch.cuda.device_count()
            if info.local_rank >= n:
                raise RuntimeError(f"rank {info.rank}: LOCAL_RANK {info.local_rank} but only {n} visible "
                                   "GPU(s): use --nproc-per-node <= the GPUs per node")
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(info.device))
            _group = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    _info = info
    return info


def current() -> DistInfo:
    """The info of `init()`; a single process when init() was not called (with a warning if this
    process is one of several, which would then each do all the work)."""
    if _info is not None:
        return _info
    if _env_int("WORLD_SIZE", 1) > 1:
        warnings.warn("WORLD_SIZE > 1 but rome_fast.distributed.init() was not called: "
                      "this process works alone, on everything", stacklevel=2)
    return DistInfo()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if _info is not None and _info.distributed:
        import torch.distributed as dist
        dist.barrier(group=_group)


def broadcast(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` (picklable) on every rank."""
    if _info is None or not _info.distributed:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group)
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order."""
    if _info is None or not _info.distributed:
        return [obj]
    import torch.distributed as dist
    out = [None] * _info.world
    dist.all_gather_object(out, obj, group=_group)
    return out


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place and in its own dtype (fp64 sums stay fp64): a CUDA
    tensor over NCCL, a CPU one over the gloo group. Every rank gets the same bits."""
    if _info is None or not _info.distributed:
        return tensor
    import torch.distributed as dist
    if tensor.is_cuda and dist.get_backend() == "nccl":
        dist.all_reduce(tensor)
    else:
        host = tensor.cpu() if tensor.is_cuda else tensor
        dist.all_reduce(host, group=_group)
        if host is not tensor:
            tensor.copy_(host)
    return tensor


def agree_on_run_file(path, check: Callable[[bool], None], info: DistInfo, what_differs: str) -> None:
    """One run's settings file for all ranks: rank 0 runs check(True) (compare with `path`, or
    write it), its refusal reaches every rank, then every other rank runs check(False) (compare
    only), which also catches an output folder the ranks do not share. `check` raises ValueError
    when the settings differ; `what_differs` hints at the likely cause on another rank."""
    error = None
    if info.is_main:
        try:
            check(True)
        except ValueError as exc:
            error = str(exc)
    error = broadcast(error)  # no rank starts when rank 0 refused
    if error is not None:
        raise ValueError(error if info.is_main else f"rank {info.rank}: rank 0 refused the run: {error}")
    if not info.is_main:
        if not os.path.isfile(path):
            raise RuntimeError(f"rank {info.rank} does not see {path}, which rank 0 has written: the "
                               "output folder must be shared by all ranks (the same path on every node)")
        try:
            check(False)
        except ValueError as exc:
            raise ValueError(f"rank {info.rank}: its settings differ from those rank 0 recorded "
                             f"({what_differs} on this rank?): {exc}") from None


def shard(items: Sequence[T], info: Optional[DistInfo] = None) -> list[T]:
    """This rank's share: items[rank::world] (deterministic, disjoint, together all of them)."""
    info = info or current()
    return list(items[info.rank::info.world])


def finalize() -> None:
    """Tear the process group down (a no-op when none was started)."""
    global _info, _group
    if _info is not None and _info.distributed:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    _info, _group = None, None


class InjectedFailure(RuntimeError):
    """The failure a test asked for with ROME_FAST_FAIL_RANK / ROME_FAST_FAIL_AFTER."""


def failure_hook(unit: str, info: Optional[DistInfo] = None) -> Optional[Callable[[], None]]:
    """FOR TESTS ONLY: with ROME_FAST_FAIL_RANK=r and ROME_FAST_FAIL_AFTER=n set, rank r gets a
    function to call after each finished unit (a batch or fact of a trace, a case of an eval)
    that raises InjectedFailure once n units are written, so tests can kill a rank part-way.
    None (nothing to call) when the variables are unset or name another rank."""
    if FAIL_RANK_ENV not in os.environ:
        return None
    info = info or current()
    if _env_int(FAIL_RANK_ENV, -1) != info.rank:
        return None
    after = max(_env_int(FAIL_AFTER_ENV, 1), 1)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if done[0] >= after:
            if os.environ.get(FAIL_KILL_ENV) == "1":  # as the OOM killer or a preemption would
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFailure(f"rank {info.rank}: failing on purpose after {done[0]} {unit}(s) "
                                  f"({FAIL_RANK_ENV}/{FAIL_AFTER_ENV} are set)")
    return tick
