"""DistributedDataParallel helpers: rank queries, metric all-reduce, a fixed-shard sampler.

The trainer works on a model the user wrapped in ``DistributedDataParallel`` (under
``torchrun``, or ``torch.multiprocessing.spawn``); attacks run on the unwrapped
module so that input-only gradients never touch DDP's gradient reducer.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = ["is_initialized", "rank", "world_size", "is_main", "barrier", "shutdown", "comm_device", "all_reduce_sum_",
           "collective", "unwrap", "is_ddp", "init_from_env", "ShardedSampler", "set_sampler_epoch"]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy the group.

    A rank that destroys its group (or exits) while another still talks to it can die
    in gloo's worker threads (SIGABRT, "terminate called without an active exception");
    the barrier first makes the teardown collective. A no-op without a group."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where the process group's collectives take their tensors: gloo CPU, NCCL CUDA."""
    if _backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _backend() -> str:
    return str(dist.get_backend())


# How long ``collective`` waits for the backend's threads to drop the tensors it was given.
RELEASE_TIMEOUT_S = 5.0
_release_warned = False


def collective(run: Callable[[], object], tensors: Sequence[torch.Tensor]) -> None:
    """Run the synchronous collective ``run()`` on ``tensors``, then wait until the backend's
    worker threads hold none of them any more.

    Why: gloo's worker thread drops its reference to a finished collective a moment after
    the caller's ``wait()`` returns, and a later barrier keeps (weak) references to the
    collectives still in flight when it was queued, which keep their tensors alive until
    the barrier is freed. If that last reference to a tensor Python made goes away on a
    gloo thread while the interpreter is finalizing, the thread must take the GIL to free
    the tensor's Python object, cannot, and the process dies with SIGABRT ("terminate
    called without an active exception") after all its work is done (seen: 3 of 117
    ``torchrun … fastadv eval`` runs on a loaded 2-core machine; core dump:
    ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil ->
    pthread_exit inside a noexcept destructor). Waiting here until each tensor's
    reference count is back where it was makes every such release happen while Python
    still owns the tensor, so it never needs the GIL.

    Only under gloo: NCCL's works are released by its watchdog thread, which polls at
    intervals of up to ~100 ms after the GPU finished, and waiting for it would add that to
    every collective."""
    global _release_warned
    if not is_initialized() or _backend() != "gloo" or not all(hasattr(t, "_use_count") for t in tensors):
        run()
        return
    counts = [t._use_count() for t in tensors]
    run()
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    delay = 1e-4
    while any(t._use_count() > c for t, c in zip(tensors, counts)):
        if time.monotonic() > deadline:
            if not _release_warned:
                _release_warned = True
                warnings.warn("fastadv: the process group's threads still hold a collective's tensors "
                              f"{RELEASE_TIMEOUT_S:g} s after it finished; if this process later aborts "
                              "at exit (SIGABRT), that is why", RuntimeWarning, stacklevel=2)
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in one process); the tensor travels to the
    backend's device (``comm_device``) and back."""
    if not is_initialized() or world_size() == 1:
        return t
    buf = t.to(comm_device())
    collective(lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM), [buf])
    if buf is not t:
        t.copy_(buf)
    return t


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP/DataParallel wrapper (the model itself otherwise)."""
    return model.module if is_ddp(model) else model


def init_from_env(backend: Optional[str] = None) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment; return this rank's
    device (its GPU under NCCL, the CPU under gloo). Without ``torchrun``: one process, no group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not is_initialized():
        dist.init_process_group(backend=backend)
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def set_sampler_epoch(loader, epoch: int) -> None:
    """Call ``set_epoch`` on the loader's sampler (DistributedSampler, ShardedSampler) if it has one."""
    for s in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if s is not None and hasattr(s, "set_epoch"):
            s.set_epoch(epoch)
            return


class ShardedSampler(Sampler):
    """Each rank keeps the same shard of the data set every epoch, shuffled within.

    ``DistributedSampler`` deals samples to ranks anew each epoch, so a sample's
    cached ATTA perturbation would sit on another rank; with a fixed shard each
    rank's cache covers exactly the samples it sees. Shards are padded (by
    repetition) to equal length so every rank runs the same number of steps."""

    def __init__(self, dataset, num_replicas: Optional[int] = None, rank_: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0):
        self.n = len(dataset)
        self.num_replicas = world_size() if num_replicas is None else int(num_replicas)
        self.rank = rank() if rank_ is None else int(rank_)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank: expected 0 <= rank < {self.num_replicas}, got {self.rank}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.num_samples = math.ceil(self.n / self.num_replicas)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        padded = torch.cat([order, order[: self.num_samples * self.num_replicas - self.n]])
        self.shard = padded[self.rank::self.num_replicas].clone()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(self.shard.tolist())
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + self.rank)
        return iter(self.shard[torch.randperm(len(self.shard), generator=g)].tolist())
