"""Issue 9 on CPU: abort semantics, the watchdog, and prompt teardown.

Each scenario that could hang before the fix runs in a subprocess under a
hard timeout, so a regression fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
HUGE_US = 3e8  # a simulated wire that takes 300 s per collective


def run_py(code: str, timeout: float = 90.0) -> tuple[int, float, str]:
    """Runs `code` in a fresh interpreter; (exit code, seconds, output)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, timeout=timeout, capture_output=True, text=True
    )
    return p.returncode, time.monotonic() - t0, p.stdout + p.stderr


# Shared prelude: a raw scheduler on the simulated transport, one bucket.
RAW = """
import time, torch
from zerocomm._ext import _C
def make(latency_us, timeout_ms):
    comm = _C.simulated_communicator(latency_us, 10.0, 8)
    s = _C.SyncScheduler(_C.make_stream(-1), comm, timeout_ms)
    s.add_param_bucket(torch.zeros(64), 0, "b0")
    return s, comm
"""


def test_abort_then_check_and_collectives_raise_aborted() -> None:
    from zerocomm._ext import _C

    comm = _C.simulated_communicator(0.0, 10.0, 8)
    s = _C.SyncScheduler(_C.make_stream(-1), comm, 5000)
    s.add_param_bucket(torch.zeros(64), 0, "b0")
    s.launch([0])
    s.host_synchronize()
    s.abort()
    assert s.aborted and comm.aborted
    for call in (
        comm.check_error,
        s.check,
        s.host_synchronize,
        s.synchronize,
        lambda: s.launch([0]),
        lambda: s.wait_param(0),
    ):
        with pytest.raises(RuntimeError, match="aborted"):
            call()
    comm.abort()  # idempotent


def test_c10d_communicator_after_abort() -> None:
    from zerocomm._ext import _C

    pg = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=5))
    comm = _C.c10d_communicator(pg, 5000)
    comm.check_error()
    comm.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        comm.check_error()
    s = _C.SyncScheduler(_C.make_stream(-1), comm, 5000)
    s.add_param_bucket(torch.zeros(64), 0, "b0")
    with pytest.raises(RuntimeError, match="aborted"):
        s.launch([0])  # the collective is never issued on a freed transport
    assert s.aborted  # a throwing check_error() marks the scheduler aborted


def test_watchdog_fires_without_any_host_wait() -> None:
    """The CUDA case on CPU: nobody waits on the host, yet after the timeout
    the watchdog has aborted the communicator and the next call raises."""
    rc, secs, out = run_py(
        RAW
        + """
s, comm = make(%r, 1000)
s.launch([0])
t0 = time.monotonic()
while not comm.aborted and time.monotonic() - t0 < 10:
    time.sleep(0.05)
print("aborted_after", round(time.monotonic() - t0, 2))
try:
    s.check()
    print("no error")
except RuntimeError as e:
    print("raised", e)
t1 = time.monotonic()
del s
print("deleted_in", round(time.monotonic() - t1, 2))
"""
        % HUGE_US,
        timeout=60,
    )
    assert rc == 0, out
    aborted_after = float(out.split("aborted_after ")[1].split()[0])
    assert aborted_after <= 1.0 + 1.0, out
    assert "raised zerocomm: timed out after 1000 ms waiting for sync of bucket b0" in out, out
    assert "watchdog" in out, out
    assert float(out.split("deleted_in ")[1].split()[0]) < 2.0, out


def test_debug_delay_is_abortable() -> None:
    rc, secs, out = run_py(
        RAW
        + """
s, comm = make(0.0, 600000)
s.set_debug_delay(300.0)
s.launch([0])
time.sleep(0.2)
t0 = time.monotonic()
s.abort()
del s
print("gone_in", round(time.monotonic() - t0, 2))
""",
        timeout=60,
    )
    assert rc == 0, out
    assert float(out.split("gone_in ")[1].split()[0]) < 2.0, out


def test_exit_with_open_handles_returns_promptly() -> None:
    """Interpreter exit with handles still open: a raw scheduler with a
    stalled sync in a global, and an attached handle mid-sync. Exits rc 0
    within the timeout plus seconds (the atexit close and the destructors
    join every native thread)."""
    rc, secs, out = run_py(
        RAW
        + """
import os, torch.distributed as dist, zerocomm
from torch import nn
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
raw, _ = make(%r, 1500)
raw.launch([0])
model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
h = zerocomm.attach(model, transport=zerocomm.transport.SimulatedTransport(latency_us=%r), timeout=1.5)
h.launch()
healthy = zerocomm.attach(nn.Linear(4, 4))  # open, idle
print("exiting", flush=True)
"""
        % (HUGE_US, HUGE_US),
        timeout=90,
    )
    assert rc == 0, out
    assert "exiting" in out and "terminate called" not in out, out


def _sim_job(rank: int, world: int) -> dict:
    import zerocomm

    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    h = zerocomm.attach(model, transport=zerocomm.transport.SimulatedTransport(latency_us=HUGE_US), timeout=2.0)
    h.launch()
    t0 = time.monotonic()
    try:
        model(torch.randn(2, 8))
        raised = None
    except RuntimeError as e:
        raised = str(e)
    raised_after = time.monotonic() - t0
    c0 = time.monotonic()
    h.close()
    return {"raised": raised, "raised_after": raised_after, "closed_in": time.monotonic() - c0}


def test_simulated_stall_raises_and_closes() -> None:
    res = run_ranks(_sim_job, 1, timeout=90)[0]
    assert res["raised"] is not None and "timed out" in res["raised"] and "bucket" in res["raised"], res
    assert res["raised_after"] <= 2.0 + 2.0, res
    assert res["closed_in"] < 3.0, res


STALL_TIMEOUT_S = 5.0


def _stall_job(rank: int, world: int) -> dict:
    import zerocomm

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = zerocomm.attach(model, opt, mode="allgather", timeout=STALL_TIMEOUT_S, bucket_mb=0.0003)
    x = torch.randn(4, 8)
    dist.barrier()  # a loaded machine starts ranks seconds apart
    for step in range(2):
        model(x).square().mean().backward()
        h.step()
        h.zero_grad()
    h.synchronize()
    dist.barrier()
    if rank == 1:  # the stalled peer: alive, silent, then gone
        time.sleep(3 * STALL_TIMEOUT_S)
        os._exit(18)
    t0 = time.monotonic()
    raised = None
    try:
        for _ in range(3):
            model(x).square().mean().backward()
            h.step()
            h.zero_grad()
        h.synchronize()
    except RuntimeError as e:
        raised = str(e)
    raised_after = time.monotonic() - t0
    c0 = time.monotonic()
    h.close()
    return {"raised": raised, "raised_after": raised_after, "closed_in": time.monotonic() - c0}


def test_stalled_gloo_peer_raises_within_timeout_and_close_returns() -> None:
    results = run_ranks(_stall_job, 2, timeout=120, expect_errors=True)
    assert results[1]["exitcode"] == 18, results[1]
    r0 = results[0]
    assert not r0["killed"] and r0["exitcode"] == 0 and "ok" in r0, r0
    out = r0["ok"]
    assert out["raised"] is not None and out["raised"].startswith("zerocomm:") and "bucket" in out["raised"], out
    assert out["raised_after"] <= STALL_TIMEOUT_S + 2.0, out
    assert out["closed_in"] < 3.0, out


def test_two_ranks_on_one_device_are_named() -> None:
    from zerocomm.validate import describe_shared_devices

    assert describe_shared_devices([("h", 0), ("h", 1), None], [0, 1, 2]) is None
    assert describe_shared_devices([("h", 0), ("g", 0)], [0, 1]) is None  # two hosts
    msg = describe_shared_devices([("h", 0), ("h", 1), ("h", 1)], [0, 4, 7])
    assert msg is not None and "ranks 4 and 7" in msg and "cuda:1" in msg and "set_device" in msg


class _FakeOptions:
    _timeout = timedelta(seconds=123)


class _FakeBackend:
    options = _FakeOptions()


class _NcclOnlyGroup:
    def _get_backend(self, device: torch.device) -> _FakeBackend:
        if device.type != "cuda":
            raise RuntimeError("no backend for cpu")
        return _FakeBackend()


def test_group_timeout_reads_a_pure_nccl_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from zerocomm.transport import group_timeout_s

    assert group_timeout_s(_NcclOnlyGroup()) == 123.0

    class Opaque:
        def _get_backend(self, device: torch.device) -> None:
            raise RuntimeError("nothing exposed")

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    expected = dist.distributed_c10d._get_default_timeout("nccl").total_seconds()
    assert group_timeout_s(Opaque()) == expected


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_native_threads_are_joined() -> None:
    """Each scheduler owns two native threads (CPU worker, watchdog); both
    are gone once it is destroyed, healthy or aborted."""
    import gc

    from zerocomm._ext import _C

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def make(i: int) -> "_C.SyncScheduler":
        s = _C.SyncScheduler(_C.make_stream(-1), _C.simulated_communicator(0.0, 10.0, 8), 5000)
        s.add_param_bucket(torch.zeros(16), 0, f"b{i}")
        s.launch([0])
        return s

    warm = make(-1)  # lets torch start its own lazily created pools first
    warm.host_synchronize()
    del warm
    before = threads()
    scheds = []
    for i in range(10):
        s = make(i)
        if i % 2:
            s.abort()
        scheds.append(s)
    assert threads() >= before + 20
    del s
    scheds.clear()
    gc.collect()
    assert threads() <= before, f"{threads() - before} native threads left running"
