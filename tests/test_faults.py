"""Faults: a peer that dies or stalls in the middle of a step makes the
surviving ranks raise an error naming the zerocomm sync and bucket, within
the configured timeout plus a margin; close() then returns; every process
exits by itself (run_ranks would have to kill a hung one, which the tests
assert did not happen).

3 gloo ranks; rank 2 is the victim. Steps 0 and 1 run normally (the forward
order is learned and the syncs are warm); the fault comes in step 2.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from dist_utils import run_ranks
from torch import nn

WORLD, VICTIM, FAULT_STEP = 3, 2, 2
TIMEOUT_S = 6.0  # zerocomm's `timeout=`: short, so the stall case stays quick
MARGIN_S = 30.0  # the acceptance bound: raise within timeout + 30 s


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])


def _fault(where: str, here: str) -> None:
    """The victim dies (exit) or stalls past every timeout at `here`."""
    if where.endswith(here):
        if where.startswith("exit"):
            os._exit(17)  # no cleanup, no goodbye to the peers: like a crashed node
        time.sleep(4 * TIMEOUT_S)  # stall: alive, connections open, silent
        os._exit(18)


def _job(rank: int, world: int, where: str, mode: str) -> dict:
    """Trains until the fault; survivors return what they raised and when."""
    import zerocomm

    model = _model()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    with_opt = not where.endswith("launch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if with_opt else None
    # tiny buckets: several syncs in flight when the fault comes
    handle = zerocomm.attach(model, opt, mode=mode, timeout=TIMEOUT_S, bucket_mb=0.0003)
    victim = rank == VICTIM
    t0 = None
    try:
        for step in range(FAULT_STEP + 3):
            if step == FAULT_STEP:
                t0 = time.monotonic()
            loss = model(x).square().mean()
            if with_opt:
                loss.backward()
                if step == FAULT_STEP and victim:
                    _fault(where, "after_backward")
                handle.step()
                if step == FAULT_STEP and victim:
                    _fault(where, "after_step")
                handle.zero_grad()
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(0.5)  # stands in for an update of the owned params
                handle.launch()
                if step == FAULT_STEP and victim:
                    _fault(where, "after_launch")
        handle.synchronize()
    except Exception as e:  # the survivors' expected path
        raised_after = time.monotonic() - t0 if t0 is not None else -1.0
        c0 = time.monotonic()
        handle.close()
        closed_in = time.monotonic() - c0
        # the handle stays unusable rather than hanging
        try:
            handle.synchronize()
            after_close = "no error"
        except Exception as e2:
            after_close = str(e2)
        return {
            "raised": f"{type(e).__name__}: {e}",
            "raised_after": raised_after,
            "closed_in": closed_in,
            "after_close": after_close,
        }
    handle.close()
    return {"raised": None}


CASES = [
    ("exit_after_backward", "broadcast"),
    ("exit_after_step", "allgather"),
    ("exit_after_launch", "broadcast"),
    ("stall_after_backward", "allgather"),
]


@pytest.mark.parametrize("where,mode", CASES)
def test_peer_fault_raises_on_survivors(where: str, mode: str) -> None:
    t_start = time.monotonic()
    # spawn + import (seconds on a loaded 2-core machine) + steps + timeout + margin
    results = run_ranks(_job, WORLD, where, mode, timeout=60 + TIMEOUT_S + MARGIN_S, expect_errors=True)
    total = time.monotonic() - t_start
    for rank, res in enumerate(results):
        assert not res["killed"] and not res["alive"], f"rank {rank} hung and had to be killed: {res}"
    victim = results[VICTIM]
    assert victim["exitcode"] == (17 if where.startswith("exit") else 18), victim
    for rank in range(WORLD):
        if rank == VICTIM:
            continue
        res = results[rank]
        assert res.get("exitcode") == 0 and "ok" in res, f"rank {rank} failed outside the expected path: {res}"
        out = res["ok"]
        assert out["raised"] is not None, f"rank {rank} finished the loop although its peer was gone"
        msg = out["raised"]
        # names zerocomm's sync and its bucket, whatever gloo itself said
        assert msg.startswith("RuntimeError: zerocomm:"), msg
        assert "bucket" in msg, msg
        assert out["raised_after"] <= TIMEOUT_S + MARGIN_S, out
        assert out["closed_in"] <= TIMEOUT_S + MARGIN_S, out
        assert "closed" in out["after_close"], out
    print(where, mode, {r: results[r].get("ok") for r in range(WORLD)}, f"total {total:.1f} s")


PEER_GONE_KEY = "test_faults/peer_may_leave"


def _job_close_while_referenced(rank: int, world: int) -> dict:
    """Rank 1 launches a sync that rank 0 never joins: its forward raises
    from the forward hook, whose frame -- kept by the exception's traceback
    -- holds the scheduler past close(). Rank 0 leaves only once rank 1 is
    tearing down, so rank 1's in-flight gloo work ends (and gloo's thread
    releases its tensors, which takes the GIL) during that teardown."""
    import torch.distributed as dist

    import zerocomm
    from zerocomm import transport

    # gloo's own timeout longer than zerocomm's: the work is still in flight
    # when zerocomm gives up, and ends only when rank 0 leaves
    private_gloo = transport.private_gloo
    transport.private_gloo = lambda group, tag, _timeout_s: private_gloo(group, tag, 60.0)  # type: ignore[assignment]
    model = _model()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    handle = zerocomm.attach(model, mode="broadcast", timeout=TIMEOUT_S / 3, bucket_mb=0.0003)
    store = dist.distributed_c10d._get_default_store()
    for _ in range(2):
        model(x)
        handle.launch()
    if rank == 0:
        store.wait([PEER_GONE_KEY])
        time.sleep(2.0)  # rank 1 is in its close() (or, before the fix, past it)
        handle.close()
        return {"raised": None}
    handle.launch()  # rank 0 never joins this sync
    try:
        model(x)  # waits in the forward hook: times out there
    except Exception as e:  # the traceback's hook frame holds the scheduler
        store.set(PEER_GONE_KEY, "1")
        handle.close()
        return {"raised": f"{type(e).__name__}: {e}"}
    return {"raised": None}


def test_close_while_a_traceback_holds_the_scheduler() -> None:
    """close() tears the native side down itself, without the GIL: the
    scheduler's Python object dying later (here: when the except block
    ends) must not be what joins gloo's threads. Before, that join ran
    under the GIL while gloo's thread waited for the GIL to free the failed
    work's tensors: rank 1 hung for good (or, at interpreter exit, aborted
    with "terminate called without an active exception")."""
    results = run_ranks(_job_close_while_referenced, 2, timeout=60, expect_errors=True)
    for rank, res in enumerate(results):
        assert not res["killed"] and not res["alive"], f"rank {rank} hung and had to be killed: {res}"
        assert res.get("exitcode") == 0 and "ok" in res, f"rank {rank} failed: {res}"
    raised = results[1]["ok"]["raised"]
    assert raised is not None and raised.startswith("RuntimeError: zerocomm:") and "bucket" in raised, raised
    assert results[0]["ok"]["raised"] is None
