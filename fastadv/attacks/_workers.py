"""Row-parallel model passes on a multi-core CPU.

A small network's forward and backward on a batch of a few hundred rows uses two or more
intra-op threads poorly: each layer is a handful of short parallel regions separated by
barriers, and the threads spend much of each pass waiting for one another. Attacks need
no coupling between rows (the model runs in eval mode), so ``split_rows`` instead cuts a
batch into one block per thread and runs each block's whole pass on its own worker thread
at one intra-op thread: the same per-row math with no barriers between layers. On the
2-core machines this project is developed on, a forward+input-backward of the MNIST CNN
on 132 rows ran 1.4x faster on two intra-op threads than on one, and 2.0x faster as two
66-row blocks on two workers.

It applies only where it is safe and pays: a CPU batch of at least ``MIN_ROWS`` rows per
thread, ``torch.get_num_threads() >= 2``, and a model that is an ``nn.Module`` (or a bound
method or partial of one) with every module in eval mode (batch statistics would couple
the rows; dropout would draw from the shared generator in an order the threads decide),
not wrapped in DistributedDataParallel/DataParallel or compiled by ``torch.compile``.
``FASTADV_CPU_WORKERS=1`` turns it off (for a model whose forward keeps state across
calls); another number sets the worker count instead of ``torch.get_num_threads()``.
Workers run with one intra-op thread each, so a pass they make never splits again.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["MIN_ROWS", "worker_count", "split_count", "split_rows", "held_mode"]

MIN_ROWS = 32  # rows per block below which one pass on all threads is as fast

_lock = threading.Lock()
_pool: Optional[tuple] = None  # (pid, workers, executor)


def worker_count() -> int:
    """Worker threads a split would use here (1: no splitting)."""
    env = os.environ.get("FASTADV_CPU_WORKERS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"FASTADV_CPU_WORKERS: expected a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"FASTADV_CPU_WORKERS: expected a positive integer, got {env!r}")
        return n
    return torch.get_num_threads()


# modules an attack holds in a mode (``preserved_model``), innermost last: True where it put
# every submodule in eval mode, so the passes need not walk the submodules to know (~0.1 ms
# on a small CNN, once per Square query)
_held: Dict[int, List[bool]] = {}


@contextlib.contextmanager
def held_mode(module: nn.Module, all_eval: bool) -> Iterator[None]:
    """Note, for the block, whether every submodule of ``module`` is in eval mode (False:
    unknown, look)."""
    key = id(module)
    with _lock:
        _held.setdefault(key, []).append(bool(all_eval))
    try:
        yield
    finally:
        with _lock:
            stack = _held[key]
            stack.pop()
            if not stack:
                del _held[key]


def _splittable_model(module: Optional[nn.Module]) -> bool:
    if module is None:
        return False
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return False
    if type(module).__name__ == "OptimizedModule":  # torch.compile's wrapper
        return False
    stack = _held.get(id(module))
    if stack and stack[-1]:
        return True
    return not any(m.training for m in module.modules())


def split_count(x: torch.Tensor, module: Optional[nn.Module], min_rows: int = MIN_ROWS,
                model: bool = True) -> int:
    """Blocks to cut ``x`` into (1: run it as one pass). ``model=False``: work that calls no
    model (then ``module`` is ignored)."""
    if x.device.type != "cpu" or x.dim() == 0 or threading.current_thread().name.startswith("fastadv-cpu"):
        return 1
    n = worker_count()
    if n < 2 or x.shape[0] < n * min_rows or (model and not _splittable_model(module)):
        return 1
    return n


def _executor(n: int) -> Optional[ThreadPoolExecutor]:
    """The process's pool of ``n`` workers, each set to one intra-op thread before use;
    None if they could not be started (the caller then runs the blocks itself)."""
    global _pool
    with _lock:
        pid = os.getpid()
        if _pool is not None and _pool[0] == pid and _pool[1] == n:
            return _pool[2]
        if _pool is not None and _pool[0] == pid and _pool[2] is not None:
            _pool[2].shutdown(wait=False)
        # ATen sets up each thread's intra-op count on the thread's first parallel op, from
        # a process-wide value that torch.set_num_threads also writes: read ours (which sets
        # this thread up), and set the workers up before they change that value
        mine = torch.get_num_threads()
        ex = ThreadPoolExecutor(n, thread_name_prefix="fastadv-cpu")
        ready = threading.Barrier(n + 1)

        def one_thread():
            torch.get_num_threads()
            torch.set_num_threads(1)
            ready.wait()

        # each worker takes exactly one of these (none is idle until all have started)
        try:
            starts = [ex.submit(one_thread) for _ in range(n)]
            ready.wait(timeout=60)
            for f in starts:
                f.result()
        except (RuntimeError, threading.BrokenBarrierError) as err:  # no threads to be had
            ready.abort()
            ex.shutdown(wait=False)
            torch.set_num_threads(mine)
            warnings.warn(f"fastadv: could not start {n} CPU worker threads ({err!r}); model passes "
                          f"run on the calling thread", RuntimeWarning, stacklevel=3)
            _pool = (pid, n, None)
            return None
        torch.set_num_threads(mine)  # the process-wide value other threads start from
        _pool = (pid, n, ex)
        return ex


def split_rows(fn: Callable[[slice], object], rows: int, blocks: int) -> List[object]:
    """``[fn(s) for s in slices]`` over ``blocks`` near-equal row slices of ``rows`` rows, each
    on its own worker thread, with the caller's grad mode and CPU autocast. Results in row
    order; an error in any block is raised once every block has finished."""
    size = -(-rows // blocks)
    slices = [slice(i, min(rows, i + size)) for i in range(0, rows, size)]
    grad = torch.is_grad_enabled()
    # a caller's own CPU autocast region is thread-local too: carry it over
    cast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def call(s):
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        with torch.set_grad_enabled(grad):
            if cast is None:
                return fn(s)
            with torch.autocast("cpu", dtype=cast):
                return fn(s)

    ex = _executor(blocks)
    if ex is None:
        return [fn(s) for s in slices]
    # A C++ extension (fastadv's own CPU ops included) carries its own copy of ATen's inline
    # per-thread set-up, which on a thread's first parallel op there resets the thread's
    # intra-op count from the process-wide value: keep that value at 1 while the workers
    # run (the caller only waits meanwhile), then put the caller's back.
    mine = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [ex.submit(call, s) for s in slices]
        wait(futures)  # all of them, so none still runs the model when an error reaches the caller
    finally:
        torch.set_num_threads(mine)
    return [f.result() for f in futures]
