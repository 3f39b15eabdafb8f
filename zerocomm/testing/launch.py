"""The one process launcher of the demo, the benchmarks and the scale model.

Three ways a job's ranks come to exist, each running fn(rank, world, *args):

    spawn_gloo_ranks(fn, world, args)    plain `python script.py`: this process spawns
                                         `world` gloo ranks on 127.0.0.1 and returns
                                         each rank's return value
    run_env_rank(fn, args, backend)      this process is one rank started by torchrun
                                         (RANK, WORLD_SIZE, MASTER_* in the environment)
    set_single_rank_env()                plain `python` on one GPU: make this process
                                         rank 0 of a one-rank group, then run_env_rank

Depends on torch and the standard library only, so any script can use it.
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

T = TypeVar("T")

LOCALHOST = "127.0.0.1"


def under_torchrun() -> bool:
    """True when a launcher (torchrun, or set_single_rank_env) made this process a rank."""
    return "RANK" in os.environ


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; another process may take it
    before the rendezvous binds it, which is unlikely enough for benchmarks)."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def set_single_rank_env() -> None:
    """Make this process rank 0 of a one-rank group (e.g. NCCL on one GPU without torchrun)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR=LOCALHOST, MASTER_PORT=str(free_port()))


def run_env_rank(
    fn: Callable[..., T],
    args: Sequence[Any],
    backend: str,
    *,
    device: torch.device | None = None,
    cpu_threads: int | None = None,
) -> T:
    """Join the group described by the environment, run fn(rank, world, *args), leave it.

    device: passed to init_process_group as device_id (NCCL binds its communicator
    to it eagerly). cpu_threads: torch.set_num_threads before joining (None: leave it).
    """
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    dist.init_process_group(backend, device_id=device)
    try:
        return fn(dist.get_rank(), dist.get_world_size(), *args)
    finally:
        dist.destroy_process_group()


def exit_rank() -> None:
    """End a spawned rank whose result is written: run the atexit handlers
    (zerocomm closes what is still open) while the interpreter is whole,
    flush, and leave without interpreter finalization.

    [Note: rank exit] A gloo worker thread releases a finished work a
    moment after the caller's wait() returned; when the work held tensors
    made in Python (`all_gather_object`'s, the last collective of a
    benchmark rank), the release takes the GIL. If the rank has reached
    interpreter finalization by then, Python ends that thread with
    pthread_exit, whose unwinding through gloo's noexcept code calls
    std::terminate: "terminate called without an active exception", SIGABRT
    after the rank's work is done (seen in 1 of ~10 overlap benchmark runs;
    backtrace: ProcessGroupGloo::runLoop -> TensorImpl::decref_pyobject ->
    PyEval_AcquireThread -> pthread_exit). A torch issue (gloo process groups
    and interpreter exit), not zerocomm's; a rank that skips finalization
    cannot meet it."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, args: Sequence[Any], out_dir: str, cpu_threads: int | None
) -> None:
    """Body of one spawned rank: its result goes to a file, not a pipe, so a large
    result cannot block the rank in a write while the parent is still joining."""
    os.environ.update(MASTER_ADDR=LOCALHOST, MASTER_PORT=str(port))
    if cpu_threads is not None:
        # ranks share this machine's cores: one intra-op thread each, or they oversubscribe
        torch.set_num_threads(cpu_threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    exit_rank()  # [Note: rank exit]


def spawn_gloo_ranks(
    fn: Callable[..., T],
    world: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float | None = None,
    cpu_threads: int | None = 1,
) -> list[T]:
    """Spawn `world` processes forming a gloo group on 127.0.0.1; each runs
    fn(rank, world, *args). Returns the ranks' return values in rank order.

    fn and args are pickled into the children (spawn start method: CUDA and the
    comm threads of the parent must not be forked), so fn must be a module-level
    function. A rank that raises makes this raise (torch's ProcessRaisedException,
    with the rank's traceback) after the other ranks are terminated. timeout_s:
    kill every rank and raise TimeoutError when the job runs longer (None: wait).
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="zerocomm_ranks_") as out_dir:
        ctx = mp.start_processes(
            _rank_entry,
            args=(fn, world, port, tuple(args), out_dir, cpu_threads),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not ctx.join(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                        p.join()
                raise TimeoutError(f"{world} gloo ranks did not finish within {timeout_s} s")
        results: list[T] = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
