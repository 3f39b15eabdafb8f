"""Lean buffers ([Note: gradient views], [Note: one bucket record]): nothing
zerocomm holds is a second copy of what a buffer already holds, nothing is
allocated per step once training runs, and ZeRO-2 (`shard_grads=True`)
trains exactly as plain torch while keeping only its slice of the gradients.

Each test would fail if a buffer were copied again: parameters must share
storage with the parameter flat, p.grad and the local optimizer's gradients
with the gradient flat, and step() must not allocate a tensor.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn as nn
from dist_utils import run_ranks
from torch.utils._python_dispatch import TorchDispatchMode

WORLD = 2
STEPS = 4
ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16, dtype=dtype) for _ in range(4))
        self.head = nn.Linear(16, 4, dtype=dtype)

    def forward(self, x: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        for i, b in enumerate(self.blocks):
            if i != skip:
                x = torch.tanh(b(x))
        return self.head(x)


def _loss(model: Any, step: int, rank: int, micro: int = 0, skip: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 100 * micro + rank)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    return ((model(x.to(model.head.weight.dtype), skip=skip).float() - y) ** 2).mean()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Allocations(TorchDispatchMode):
    """Every op whose output lives in storage none of its inputs had: a new
    tensor (views and in-place ops reuse their input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.new: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        seen = {_storage(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > 0 and _storage(t) not in seen:
                self.new.append(f"{func} -> {tuple(t.shape)} {t.dtype}")
        return out


# -- the jobs ----------------------------------------------------------------------
def _views_job(rank: int, world: int, mode: str, shard_grads: bool) -> dict:
    import zerocomm
    from zerocomm.handed_over import HandedOver

    torch.manual_seed(0)
    model = Net()
    # plain SGD (foreach, no momentum, no decay) steps in place: any tensor
    # allocated in step() is zerocomm's
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=0.001, shard_grads=shard_grads)
    out: dict[str, Any] = {}
    units = zopt.units
    ptrs: list[set[int]] = []
    for step in range(STEPS):
        if step == STEPS - 1:
            # accumulating (not handed over yet): p.grad is a view of its bucket
            with zopt.no_sync():
                _loss(model, step, rank).backward()
            views, shared, markers = [], [], []
            for u in units:
                for rec in u.buckets:
                    for k, i in enumerate(rec.spec.params):
                        p = u.plan.params[i].param
                        # the parameter is a view of the bucket's parameter flat
                        shared.append(
                            _storage(p) == _storage(rec.param_flat)
                            and p.storage_offset() == rec.param_flat.storage_offset() + rec.spec.offsets[k]
                        )
                        if rec.grad_flat is not None:
                            views.append(p.grad is not None and _storage(p.grad) == _storage(rec.grad_flat))
                        else:
                            # ZeRO-2: released once handed over (a marker without storage)
                            views.append(isinstance(p.grad, HandedOver))
            _loss(model, step, rank).backward()
            # handed over: a marker without storage in every mode
            markers = [isinstance(p.grad, HandedOver) for p in model.parameters()]
            out["handed_over_markers"] = all(markers)
            out["params_are_views"] = all(shared)
            out["grads_are_views"] = all(views)
            with _Allocations() as mode_:
                zopt.step()
                zopt.zero_grad()
            out["step_allocations"] = mode_.new
        else:
            _loss(model, step, rank).backward()
            zopt.step()
            zopt.zero_grad()
        bufs = {_storage(r.param_flat) for u in units for r in u.buckets}
        bufs |= {_storage(t) for u in units for r in u.buckets for t in (r.grad_flat, r.grad_shard) if t is not None}
        ptrs.append(bufs)
    out["buffers_stable"] = all(p == ptrs[0] for p in ptrs)
    # the local optimizer's gradients and parameters are views of the bucket's buffers
    _loss(model, STEPS, rank).backward()
    zopt._bind_grads()
    flats = {_storage(r.param_flat) for u in units for r in u.buckets}
    grads = {_storage(t) for u in units for r in u.buckets for t in (r.grad_flat, r.grad_shard) if t is not None}
    out["local_params_in_flats"] = all(_storage(lp.tensor) in flats for lp in zopt.buffers.locals())
    out["local_grads_in_buffers"] = all(
        _storage(lp.tensor.grad) in grads for lp in zopt.buffers.locals() if lp.tensor.grad is not None
    )
    out["buffer_bytes"] = zopt.buffer_bytes()
    zopt.close()
    return out


def _bf16_job(rank: int, world: int, mode: str) -> dict:
    import zerocomm

    torch.manual_seed(0)
    model = Net(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    shard_grads = mode == "zero2"
    mode = "allgather" if shard_grads else mode
    zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=0.001, master_dtype=torch.float32, shard_grads=shard_grads)
    for step in range(3):
        _loss(model, step, rank).backward()
        if step == 2:
            with _Allocations() as m:
                zopt.step()
        else:
            zopt.step()
        zopt.zero_grad()
    # the fp32 gradient of what this rank steps lives in the dead part of the bf16 gradient
    # store (allgather: beside its slice; broadcast: beside its owned buckets); ZeRO-2: the
    # kept slice is the fp32 gradient itself
    stepped = [r for u in zopt.units for r in u.buckets if r.locals]
    in_bucket = bool(stepped) and all(
        r.master_grad is not None
        and (r.master_grad is r.grad_shard if shard_grads else _storage(r.master_grad) == _storage(r.grad_flat))
        for r in stepped
    )
    zopt.synchronize()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    zopt.close()
    return {"step_allocations": m.new, "master_grad_in_bucket": in_bucket, "params": params}


def _train(rank: int, mode: str, case: str, shard_grads: bool) -> dict[str, torch.Tensor]:
    import zerocomm

    torch.manual_seed(0)
    model = Net()
    # foreach: the user's own optimizer's zero_grad(set_to_none=False) then zeroes with _foreach_zero_
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=case == "outside_zero_grad")
    zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=0.001, shard_grads=shard_grads)
    for step in range(STEPS):
        skip = 2 if case == "skip" and step % 2 else None
        if case == "accum":  # two micro-batches; ZeRO-2 reduces each (no_sync has no effect there)
            with zopt.no_sync():
                (_loss(model, step, rank, 0) / 2).backward()
            (_loss(model, step, rank, 1) / 2).backward()
        else:
            _loss(model, step, rank, skip=skip).backward()
        if case == "clip":
            zopt.clip_grad_norm_(0.05)
        if case == "abandoned" and step == 1:
            # a step refused after the reductions were launched, then the loop goes on
            zopt.grad_scale = torch.ones(())  # type: ignore[attr-defined]
            with pytest.raises(NotImplementedError):
                zopt.step()
            del zopt.grad_scale  # type: ignore[attr-defined]
            zopt.zero_grad()
            continue
        zopt.step()
        if case == "outside_zero_grad" and step % 2:
            opt.zero_grad(set_to_none=False)  # the optimizer passed to attach, over the model's parameters
        elif case == "outside_zero_grad":
            model.zero_grad(set_to_none=False)  # zeroes the handed-over markers: zerocomm must notice
        else:
            zopt.zero_grad()
    zopt.synchronize()
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    zopt.close()
    return out


def _exact_job(rank: int, world: int) -> dict:
    out: dict[Any, Any] = {}
    for case in ("plain", "accum", "skip", "clip"):
        out["zero2", case] = _train(rank, "allgather", case, True)
    for mode in ("broadcast", "allgather"):
        out[mode, "outside_zero_grad"] = _train(rank, mode, "outside_zero_grad", False)
        out[mode, "abandoned"] = _train(rank, mode, "abandoned", False)
    out["zero2", "abandoned"] = _train(rank, "allgather", "abandoned", True)
    out["zero2", "outside_zero_grad"] = _train(rank, "allgather", "outside_zero_grad", True)
    # close() gives p.grad its own memory: the buckets go with the handle
    torch.manual_seed(0)
    model = Net()
    import zerocomm

    zopt = zerocomm.attach(model, torch.optim.AdamW(model.parameters()), mode="allgather", bucket_mb=0.001)
    _loss(model, 0, rank).backward()
    zopt.step()
    zopt.zero_grad()
    with zopt.no_sync():  # accumulated, not handed over: p.grad views the buckets
        _loss(model, 1, rank).backward()
    flats = {_storage(r.grad_flat) for u in zopt.units for r in u.buckets}
    zopt.close()
    out["closed_grads_own"] = all(p.grad is not None and _storage(p.grad) not in flats for p in model.parameters())
    # handed over at close: the marker goes (a plain backward could not drop it)
    zopt = zerocomm.attach(model, torch.optim.AdamW(model.parameters()), mode="allgather", bucket_mb=0.001)
    _loss(model, 2, rank).backward()
    zopt.close()
    out["closed_markers_none"] = all(p.grad is None for p in model.parameters())
    _loss(model, 3, rank).backward()  # the plain model trains on
    out["plain_backward_after_close"] = all(p.grad is not None for p in model.parameters())
    return out


def _stale_job(rank: int, world: int, mode: str) -> str:
    import zerocomm

    torch.manual_seed(0)
    model = Net()
    zero2 = mode == "zero2"
    mode = "allgather" if zero2 else mode
    zopt = zerocomm.attach(model, torch.optim.AdamW(model.parameters()), mode=mode, bucket_mb=0.001, shard_grads=zero2)
    try:
        _loss(model, 0, rank).backward()
        zopt.step()  # no zero_grad: the next backward would add to the reduction's result
        _loss(model, 1, rank).backward()
        zopt.step()
        return "no error"
    except RuntimeError as e:
        return str(e)
    finally:
        zopt.close()


def _torch_clip_job(rank: int, world: int, mode: str, how: str) -> str:
    """torch's own clipping on the model's parameters after backward, or a
    read of p.grad for logging."""
    import zerocomm

    torch.manual_seed(0)
    model = Net()
    zero2 = mode == "zero2"
    zopt = zerocomm.attach(
        model,
        torch.optim.AdamW(model.parameters()),
        mode="allgather" if zero2 else mode,
        bucket_mb=0.001,
        shard_grads=zero2,
    )
    try:
        _loss(model, 0, rank).backward()
        if how == "norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        elif how == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
        else:  # logging the per-parameter gradient norms
            sum(p.grad.norm() for p in model.parameters() if p.grad is not None)
        zopt.step()
        return "no error"
    except RuntimeError as e:
        return str(e)
    finally:
        zopt.close()


def _reference(case: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        if case == "abandoned" and step == 1:
            continue
        skip = 2 if case == "skip" and step % 2 else None
        if case == "accum":
            loss = sum((_loss(model, step, r, 0) + _loss(model, step, r, 1)) / 2 for r in range(WORLD)) / WORLD
        else:
            loss = sum(_loss(model, step, r, skip=skip) for r in range(WORLD)) / WORLD
        loss.backward()
        if case == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the tests -----------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _views(mode: str, shard_grads: bool) -> list[dict]:
    return run_ranks(_views_job, WORLD, mode, shard_grads, timeout=180)


LEAN = [("broadcast", False), ("allgather", False), ("allgather", True)]


@pytest.mark.parametrize("mode,shard_grads", LEAN)
def test_parameters_and_gradients_are_views_of_the_buffers(mode: str, shard_grads: bool) -> None:
    for r in _views(mode, shard_grads):
        assert r["params_are_views"], "a parameter is not a view of its bucket's parameter flat"
        assert r["grads_are_views"], "p.grad is not a view of its bucket's gradient flat (or, ZeRO-2, not released)"
        assert r["handed_over_markers"], "p.grad is not a HandedOver marker after its bucket was handed over"
        assert r["local_params_in_flats"], "a local optimizer tensor does not share the parameter flat's storage"
        assert r["local_grads_in_buffers"], "a local optimizer gradient is a copy, not a view of the gradient buffer"


@pytest.mark.parametrize("mode,shard_grads", LEAN)
def test_nothing_allocated_per_step(mode: str, shard_grads: bool) -> None:
    for r in _views(mode, shard_grads):
        assert r["step_allocations"] == [], r["step_allocations"]
        assert r["buffers_stable"], "a buffer was reallocated between steps"


def test_zero2_holds_less_than_zero1() -> None:
    zero1 = _views("allgather", False)[0]["buffer_bytes"]
    zero2 = _views("allgather", True)[0]["buffer_bytes"]
    assert zero2 < zero1, (zero2, zero1)


@functools.lru_cache(maxsize=None)
def _bf16(mode: str) -> list[dict]:
    return run_ranks(_bf16_job, WORLD, mode, timeout=180)


@pytest.mark.parametrize("mode", ["broadcast", "allgather", "zero2"])
def test_master_dtype_step_allocates_nothing(mode: str) -> None:
    for r in _bf16(mode):
        assert r["step_allocations"] == [], r["step_allocations"]
        assert r["master_grad_in_bucket"], "the fp32 master gradient is a buffer of its own"


def test_master_dtype_zero2_matches_zero1() -> None:
    """One micro-batch per step: ZeRO-2 steps the same fp32 gradients."""
    for a, b in zip(_bf16("allgather"), _bf16("zero2")):
        for n, t in a["params"].items():
            assert torch.equal(t, b["params"][n]), n


@functools.lru_cache(maxsize=None)
def _exact() -> list[dict]:
    return run_ranks(_exact_job, WORLD, timeout=300)


@pytest.mark.parametrize("case", ["plain", "accum", "skip", "clip"])
def test_zero2_exact_against_plain_torch(case: str) -> None:
    want = _reference(case)
    res = _exact()
    for r in range(WORLD):
        got = res[r]["zero2", case]
        worst = max((got[n] - want[n]).abs().max().item() for n in want)
        assert worst < ATOL, f"ZeRO-2 {case} rank {r}: max |delta| {worst:.3g}"
    for n, t in res[0]["zero2", case].items():
        assert torch.equal(t, res[1]["zero2", case][n]), f"ranks differ in {n}"


@pytest.mark.parametrize("mode", ["broadcast", "allgather", "zero2"])
def test_zero_grad_from_outside_is_exact(mode: str) -> None:
    """model.zero_grad(set_to_none=False), or that of the optimizer passed to
    attach (foreach: _foreach_zero_), zeroes the handed-over markers: the
    next backward starts from zero, as in torch."""
    want = _reference("plain")
    for r in _exact():
        got = r[mode, "outside_zero_grad"]
        worst = max((got[n] - want[n]).abs().max().item() for n in want)
        assert worst < ATOL, f"{mode}: max |delta| {worst:.3g}"


@pytest.mark.parametrize("what", ["broadcast", "allgather", "zero2"])
def test_abandoned_step_then_training_is_exact(what: str) -> None:
    """A step refused after backward launched its reductions: the next
    backward must not race them nor count their result."""
    want = _reference("abandoned")
    for r in _exact():
        got = r[what, "abandoned"]
        worst = max((got[n] - want[n]).abs().max().item() for n in want)
        assert worst < ATOL, f"{what}: max |delta| {worst:.3g}"


def test_close_releases_gradient_views() -> None:
    for r in _exact():
        assert r["closed_grads_own"] and r["closed_markers_none"] and r["plain_backward_after_close"], r


@pytest.mark.parametrize("mode", ["broadcast", "allgather", "zero2"])
def test_backward_without_zero_grad_raises(mode: str) -> None:
    for msg in run_ranks(_stale_job, WORLD, mode, timeout=120):
        assert "zopt.zero_grad()" in msg and "left from the last step" in msg, msg


@pytest.mark.parametrize("how", ["norm", "value", "read"])
@pytest.mark.parametrize("mode", ["broadcast", "allgather", "zero2"])
def test_torch_clipping_and_grad_reads_raise_on_every_rank(mode: str, how: str) -> None:
    """After hand-over the bucket is reduced in place (ZeRO-2: only this
    rank's slice is kept), so torch's clipping or any read of p.grad must
    fail loudly -- not clip a shard, find no gradient, or read a value that
    depends on how far the reduction got ([Note: handed-over gradients])."""
    for msg in run_ranks(_torch_clip_job, WORLD, mode, how, timeout=120):
        assert "handed to zerocomm's gradient reduction" in msg and "zopt.clip_grad_norm_" in msg, msg
        assert ("shard_grads=True" in msg) == (mode == "zero2"), msg


@pytest.mark.parametrize(
    "runs, nbytes, want",
    [
        # broadcast, 2 ranks owning halves of 8 bf16 elements (16 B): rank 0 widens over the
        # store from its start (last chunk first), rank 1 ending where its half ends
        ([(0, 4)], 16, [(0, False)]),
        ([(4, 8)], 16, [(0, True)]),
        # allgather slices: the copy takes the previous neighbour when there is one
        ([(2, 4), (6, 8)], 16, [(0, True), (8, True)]),
        # two own runs back to back with nothing dead before the first: it cannot widen in
        # place (the second run is live); the second ends where it ends
        ([(0, 4), (6, 8)], 16, [None, (8, True)]),
        # the last run may reach past the store (the store grows by the rest)
        ([(2, 6)], 12, [(4, False)]),
        # one rank owns everything: a store the size of the copy, no dead memory to share
        ([(0, 8)], 16, [(0, False)]),
    ],
)
def test_place_widened(runs: list, nbytes: int, want: list) -> None:
    """bf16 -> fp32 copies placed in dead gradient memory, never over another run."""
    from zerocomm.shard_buffers import place_widened

    got = place_widened(runs, 2, 4, nbytes)
    assert got == want
    placed = [(p[0], p[0] + (b - a) * 4) for (a, b), p in zip(runs, got) if p is not None]
    for k, (x, y) in enumerate(placed):  # copies never overlap each other
        assert all(y <= u or v <= x for u, v in placed[k + 1 :])
