"""Ranks that take different paths (issue 20, item 5): one rank skips step()
on a condition only it saw (calling zero_grad() as usual), or skips the last
step() and closes its handle. Every rank raises an error saying which rank
was at which step, instead of both waiting for the timeout."""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from dist_utils import run_ranks

WORLD = 2
STEPS = 4
MODES = ("broadcast", "allgather")
# attach(timeout=): far beyond the job's own limit, so neither detection nor
# close() may wait for it -- the rank whose reduction no peer joins is
# released when the peer's close() tears its transport down
TIMEOUT_S = 600.0


def _loss(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
    return ((model(x) - y) ** 2).mean()


def _run(rank: int, mode: str, case: str) -> dict:
    import zerocomm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    zopt = zerocomm.attach(model, torch.optim.AdamW(model.parameters()), mode=mode, bucket_mb=0.0005, timeout=TIMEOUT_S)
    t0 = time.monotonic()
    error = "no error"
    try:
        for step in range(STEPS):
            _loss(model, step, rank).backward()
            skip = rank == 1 and step == (1 if case == "skip_step" else STEPS - 1)
            if not skip:  # e.g. "if local_grad_norm > threshold: skip"
                zopt.step()
            zopt.zero_grad()
        zopt.synchronize()
    except RuntimeError as e:
        error = str(e)
    took = time.monotonic() - t0
    # A rank behind the divergence holds a reduction no peer will join: its
    # close() returns once the peer's close() has torn the transport down
    zopt.close()
    dist.barrier()
    return {"error": error, "took": took}


def _job(rank: int, world: int) -> dict:
    # both cases in both modes, one after the other in the same processes: a
    # close() left waiting would hang the job (killed at run_ranks' timeout)
    return {(m, c): _run(rank, m, c) for m in MODES for c in ("skip_step", "skip_last_step")}


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_ranks(_job, WORLD, timeout=120)


@pytest.mark.parametrize("mode", MODES)
def test_skipped_step_raises_on_every_rank(mode: str) -> None:
    res = [r[mode, "skip_step"] for r in _results()]
    for r, out in enumerate(res):
        msg = out["error"]
        assert "took different paths" in msg, f"rank {r}: {msg}"
        # at the vote after the skip: both at their 2nd step(), rank 1 after one more backward
        assert "rank 0 at its step() #2 after 2 backward" in msg, f"rank {r}: {msg}"
        assert "rank 1 at its step() #2 after 3 backward" in msg, f"rank {r}: {msg}"
        assert "zopt.grad_norm()" in msg, msg
        assert "on this rank" not in msg, f"rank {r} learnt it only after a failed wait: {msg}"
    print(mode, "skip_step: raised after", [round(o["took"], 1) for o in res], "s")


@pytest.mark.parametrize("mode", MODES)
def test_skipped_last_step_raises_on_the_waiting_rank(mode: str) -> None:
    res = [r[mode, "skip_last_step"] for r in _results()]
    msg = res[0]["error"]
    assert "took different paths" in msg and "rank 0 waits at its step() #4" in msg, msg
    assert "rank 1 closed its zerocomm handle at its step() #3" in msg, msg
    assert res[1]["error"] == "no error", res[1]  # rank 1 ran its own loop to the end
    print(mode, "skip_last_step: rank 0 raised after", round(res[0]["took"], 1), "s")
