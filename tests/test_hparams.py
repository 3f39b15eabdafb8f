"""Hyper-parameters changed on the torch optimizer passed to attach reach the
shards (issue 20, item 3): an LR scheduler built on it before attach (its
warm-up starts at lr 0) or after attach, a scheduler on the ZeroOptimizer,
and a hand-set lr, each exact against the same run with plain AdamW in one
process, with both optimizers showing the scheduled lr and no torch warning
about the order of the steps; a change on both objects to different values
is an error naming the group and the key, on every rank."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
from dist_utils import run_ranks
from dist_utils import tiny_mlp as _model
from dist_utils import tiny_mlp_loss as _loss

transformers = pytest.importorskip("transformers")

WORLD = 2
STEPS = 6
MODES = ("broadcast", "allgather")
CASES = ("sched_before_attach", "sched_after_attach", "sched_on_zopt", "hand_set_lr")


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() > 1]
    return [{"params": decay, "weight_decay": 0.1}, {"params": [p for p in model.parameters() if p.dim() <= 1]}]


def _schedule(opt: Any) -> Any:
    return transformers.get_cosine_schedule_with_warmup(opt, 2, STEPS)


def _run(case: str, rank: int | None, mode: str = "") -> dict:
    """rank None: the single-process reference with plain AdamW."""
    model = _model()
    opt = torch.optim.AdamW(_groups(model), lr=3e-2, weight_decay=0.0)
    sched = _schedule(opt) if case == "sched_before_attach" else None
    zopt: Any = opt
    if rank is not None:
        import zerocomm

        zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=0.0005)
    if case == "sched_after_attach":
        sched = _schedule(opt)
    if case == "sched_on_zopt":
        sched = _schedule(zopt)
    lrs: list[tuple[float, float]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            if case == "hand_set_lr" and step == 3:
                opt.param_groups[1]["lr"] = 0.1
            loss = _loss(model, step, rank) if rank is not None else sum(_loss(model, step, r) for r in range(WORLD))
            (loss if rank is not None else loss / WORLD).backward()
            zopt.step()
            if sched is not None:
                sched.step()
            zopt.zero_grad()
            lrs.append((opt.param_groups[0]["lr"], zopt.param_groups[0]["lr"]))
    if rank is not None:
        zopt.synchronize()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    if rank is not None:
        zopt.close()
    order_warnings = [str(w.message) for w in caught if "lr_scheduler" in str(w.message)]
    return {"params": params, "lrs": lrs, "warnings": order_warnings}


def _conflict(rank: int, mode: str) -> str:
    import zerocomm

    model = _model()
    opt = torch.optim.AdamW(_groups(model), lr=3e-2)
    zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=0.0005)
    try:
        _loss(model, 0, rank).backward()
        groups = zopt.param_groups  # as a scheduler on zopt holds them
        opt.param_groups[1]["lr"] = 0.1  # and another on the torch optimizer, in the same step
        groups[1]["lr"] = 0.2
        zopt.step()
        return "no error"
    except RuntimeError as e:
        return str(e)
    finally:
        zopt.close()


def _job(rank: int, world: int) -> dict:
    out: dict[Any, Any] = {}
    for mode in MODES:
        for case in CASES:
            out[case, mode] = _run(case, rank, mode)
        out["conflict", mode] = _conflict(rank, mode)
    return out


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_ranks(_job, WORLD, timeout=240)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_hyper_parameters_reach_the_shards(case: str, mode: str) -> None:
    want = _run(case, None)
    res = [r[case, mode] for r in _results()]
    for r in range(WORLD):
        got = res[r]
        worst = max((got["params"][n] - want["params"][n]).abs().max().item() for n in want["params"])
        assert worst < 1e-5, f"{case} {mode} rank {r}: max |delta| {worst:.3g} against plain AdamW"
        assert got["lrs"] == [(w, w) for w, _ in want["lrs"]], (case, mode, got["lrs"], want["lrs"])
        assert got["warnings"] == [], got["warnings"]
    for n, t in res[0]["params"].items():
        assert torch.equal(t, res[1]["params"][n]), f"{case} {mode}: ranks differ in {n}"
    # the schedule matters (else the test could not fail)
    flat = _run("none", None)
    assert max((flat["params"][n] - want["params"][n]).abs().max().item() for n in want["params"]) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_changes_on_both_optimizers_raise_on_every_rank(mode: str) -> None:
    for r in _results():
        msg = r["conflict", mode]
        for words in ("param group 1's 'lr'", "changed on both", "on one of them"):
            assert words in msg, msg
