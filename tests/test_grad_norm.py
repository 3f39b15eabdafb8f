"""The global gradient norm (issue 20, item 6): `zopt.grad_norm()` (no
clipping: logging, spike detection) and the norm `zopt.clip_grad_norm_`
returns are the norm torch computes on the single-process model's
gradients, in both modes, with and without a DDP wrapper, on every rank;
under a DDP wrapper `p.grad` after backward is DDP's average. (Without one,
the part of `p.grad` this rank steps is reduced in place asynchronously
after backward, so its value there is not defined until step(): README,
"What `p.grad` holds"; not asserted.)"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from dist_utils import run_ranks
from dist_utils import tiny_mlp as _net
from dist_utils import tiny_mlp_loss as _loss

WORLD = 2
STEPS = 3
MODES = ("broadcast", "allgather")


def _reference() -> dict:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out: dict = {"norm": [], "inf": [], "clip": [], "local": []}
    for step in range(STEPS):
        for r in range(WORLD):  # what p.grad holds on rank r after its own backward
            net.zero_grad()
            _loss(net, step, r).backward()
            out["local"].append(net[0].weight.grad.clone())
        net.zero_grad()
        (sum(_loss(net, step, r) for r in range(WORLD)) / WORLD).backward()
        grads = [p.grad for p in net.parameters()]
        out["norm"].append(torch.nn.utils.get_total_norm(grads).item())
        out["inf"].append(torch.nn.utils.get_total_norm(grads, math.inf).item())
        out["clip"].append(torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1).item())
        opt.step()
    out["params"] = {n: p.detach().clone() for n, p in net.named_parameters()}
    return out


def _sharded(rank: int, mode: str, ddp: bool) -> dict:
    import zerocomm

    net = _net()
    zopt = zerocomm.attach(net, torch.optim.SGD(net.parameters(), lr=0.1), mode=mode, bucket_mb=0.0005)
    run = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    out: dict = {"norm": [], "inf": [], "clip": [], "local": []}
    for step in range(STEPS):
        _loss(run, step, rank).backward()
        if ddp:  # DDP's all-reduce has finished when backward returns
            out["local"].append(net[0].weight.grad.clone())
        out["norm"].append(zopt.grad_norm().item())
        out["inf"].append(zopt.grad_norm(math.inf).item())
        out["clip"].append(zopt.clip_grad_norm_(0.1).item())
        zopt.step()
        zopt.zero_grad()
    zopt.synchronize()
    out["params"] = {n: p.detach().clone() for n, p in net.named_parameters()}
    zopt.close()
    return out


def _job(rank: int, world: int) -> dict:
    return {(m, ddp): _sharded(rank, m, ddp) for m in MODES for ddp in (False, True)}


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_ranks(_job, WORLD, timeout=180)


@pytest.mark.parametrize("ddp", (False, True))
@pytest.mark.parametrize("mode", MODES)
def test_global_grad_norm(mode: str, ddp: bool) -> None:
    want = _reference()
    for r, res in enumerate(_results()):
        got = res[mode, ddp]
        for key in ("norm", "inf", "clip"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (key, r, got[key], want[key])
        worst = max((got["params"][n] - want["params"][n]).abs().max().item() for n in want["params"])
        assert worst < 1e-5, f"{mode} ddp={ddp} rank {r}: clipped training off by {worst:.3g}"
        # p.grad after backward under DDP: DDP's average
        for step in range(STEPS if ddp else 0):
            local = want["local"][step * WORLD : (step + 1) * WORLD]
            torch.testing.assert_close(got["local"][step], (local[0] + local[1]) / 2, rtol=1e-6, atol=1e-7)
    a, b = (res[mode, ddp] for res in _results())
    assert a["norm"] == b["norm"] and a["clip"] == b["clip"], "ranks differ"
