"""ParamSync (zerocomm.attach without an optimizer) on gloo ranks.

Every rank perturbs ONLY what it owns (whole parameters in broadcast mode,
its slice of each bucket in allgather mode) by a deterministic, rank-dependent
amount, launches the sync and runs the next forward at once. Every rank
rebuilds independently what each owner did on a fresh copy of the model, and
the synced parameters and the forward output must match it bitwise.

Each spawned job groups several checks: starting a rank costs seconds.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch import nn

MODES = ("broadcast", "allgather")
VOCAB, SEQ = 64, 16


# --------------------------------------------------------------------- helpers
# (module level: spawned ranks unpickle the job functions by name)


def _make_model(cls: type | None = None) -> nn.Module:
    from zerocomm.testing.models import TinyGPT

    return (cls or TinyGPT)(frozen=True, n_experts=2, tie_weights=True)


def _input(rnd: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(100 + rnd))


def _delta(grank: int, rnd: int, i: int, start: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """What global rank `grank` adds, in round `rnd`, to elements
    [start, start + n) of plan param i: depends on all four, exactly reproducible."""
    base = (grank + 1) * 0.5 + rnd * 0.25 + i * 1e-3
    return (torch.arange(start, start + n, dtype=torch.float64) * 1e-4 + base).to(dtype)


def _pieces(plan, lo_hi_of) -> list[tuple[int, int, int]]:
    """(plan param index, start, numel) of every piece a group rank owns.
    `lo_hi_of(bucket)` gives that rank's shard (allgather) or None (broadcast)."""
    out = []
    for b in plan.buckets:
        rng = lo_hi_of(b)
        if rng is None:
            continue
        for pc in plan.pieces(b, *rng):
            assert pc.numel > 0
            out.append((pc.param, pc.start, pc.numel))
    return out


def _owned_by(plan, g: int, *, shard_range=None) -> list[tuple[int, int, int]]:
    """Pieces owned by group rank g. `shard_range` (the unit's own method) is
    used for the local rank, the plain formula for the others."""
    if plan.mode == "broadcast":
        return [(i, 0, s.numel) for i, (s, o) in enumerate(zip(plan.params, plan.owner)) if o == g]
    if shard_range is not None:
        return _pieces(plan, shard_range)
    return _pieces(plan, lambda b: (g * b.shard_numel, (g + 1) * b.shard_numel))


def _add(p: torch.Tensor, grank: int, rnd: int, i: int, start: int, n: int) -> None:
    with torch.no_grad():
        p.detach().view(-1).narrow(0, start, n).add_(_delta(grank, rnd, i, start, n, p.dtype))


def _perturb_owned(handle, rnd: int) -> int:
    """This rank updates what it owns in every unit; returns #pieces touched."""
    grank, touched = dist.get_rank(), 0
    for u in handle.units:
        plan = u.plan
        if plan.mode == "broadcast":
            mine = [(i, 0, s.numel) for i, s in enumerate(plan.params) if plan.param_owner(s.param) == u.rank]
        else:
            mine = _owned_by(plan, u.rank, shard_range=u.shard_range)
        for i, start, n in mine:
            _add(plan.params[i].param, grank, rnd, i, start, n)
        touched += len(mine)
    return touched


def _apply_expected(handle, ref: nn.Module, rnd: int) -> None:
    """Replay on `ref` what every owner of every unit did in round `rnd`."""
    by_name = dict(ref.named_parameters())
    for u in handle.units:
        plan = u.plan
        granks = dist.get_process_group_ranks(u.group)
        assert len(granks) == u.transport.world_size == plan.world_size
        covered = [0] * len(plan.params)
        for g, grank in enumerate(granks):
            for i, start, n in _owned_by(plan, g):
                _add(by_name[plan.params[i].name], grank, rnd, i, start, n)
                covered[i] += n
        # the test itself: every element of every synced param has exactly one owner
        assert covered == [s.numel for s in plan.params], (u.name, covered)


def _assert_params_equal(model: nn.Module, ref: nn.Module, what: str) -> None:
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    bad = [n for n in got if not torch.equal(got[n].detach(), want[n].detach())]
    assert not bad, f"{what}: {len(bad)} params differ from the owners' values, e.g. {bad[:4]}"


def _digest(model: nn.Module, names) -> str:
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if n in names:
            h.update(n.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def _expert_group(world: int, split: bool):
    """split: two expert groups [0..w/2), [w/2..w) (every rank creates both)."""
    if not split:
        return dist.new_group(ranks=list(range(world)))
    half = world // 2
    groups = [dist.new_group(ranks=list(range(0, half))), dist.new_group(ranks=list(range(half, world)))]
    return groups[dist.get_rank() // half]


# ------------------------------------------------------------------------ jobs


def _job_sync(rank: int, world: int, split_experts: bool, zero_copy: bool, bucket_mb: float) -> dict:
    """Both modes, two rounds each; returns digests for cross-rank checks."""
    import zerocomm
    from zerocomm.testing.models import is_expert_param

    egroup = _expert_group(world, split_experts)
    out = {}
    for mode in MODES:
        model, ref, init = _make_model(), _make_model(), _make_model()
        handle = zerocomm.attach(
            model,
            mode=mode,
            expert_filter=is_expert_param,
            expert_group=egroup,
            bucket_mb=bucket_mb,
            zero_copy=zero_copy,
        )
        assert [u.name for u in handle.units] == ["dense", "expert"]
        dense, expert = handle.units
        assert len(dense.plan.buckets) >= 2 and len(expert.plan.buckets) >= 2, "want several buckets"
        assert all(is_expert_param(s.name) for s in expert.plan.params)
        assert not any(is_expert_param(s.name) for s in dense.plan.params)
        assert expert.transport.world_size == (world // 2 if split_experts else world)
        in_plans = {id(s.param) for u in handle.units for s in u.plan.params}
        assert id(model.wpe.weight) not in in_plans  # frozen: out of every plan

        for rnd in range(2):
            assert _perturb_owned(handle, rnd) > 0
            _apply_expected(handle, ref, rnd)
            handle.launch()
            y = model(_input(rnd))
            handle.synchronize()
            # readable after synchronize, bitwise the owners' values
            _assert_params_equal(model, ref, f"{mode} round {rnd}")
            assert torch.equal(y, ref(_input(rnd))), f"{mode} round {rnd}: forward saw stale params"
            assert model.head.weight is model.wte.weight  # tie kept, updated once (checked above)
            assert torch.equal(model.wpe.weight, init.wpe.weight)  # frozen untouched
        # every synced param really changed (the test is not vacuous)
        init_p = dict(init.named_parameters())
        unchanged = [
            s.name for u in handle.units for s in u.plan.params if torch.equal(s.param.detach(), init_p[s.name])
        ]
        assert not unchanged, unchanged

        expert_names = {s.name for s in expert.plan.params}
        dense_names = {n for n, _ in model.named_parameters()} - expert_names
        handle.close()
        handle.close()  # idempotent
        assert _no_hooks(model), "close() left hooks behind"
        assert getattr(model, "_zerocomm_handle", None) is None
        with pytest.raises(RuntimeError, match="closed"):
            handle.launch()
        # params survive close (zero-copy views are detached from the buffers)
        _assert_params_equal(model, ref, f"{mode} after close")
        assert torch.equal(model(_input(5)), ref(_input(5)))
        out[mode] = {"dense": _digest(model, dense_names), "expert": _digest(model, expert_names)}
    return out


def _job_overlap(rank: int, world: int) -> dict:
    import zerocomm
    from zerocomm.testing.models import is_expert_param

    egroup = dist.new_group(ranks=list(range(world)))
    delay, res = 0.2, {}
    for mode in MODES:
        model, ref = _make_model(), _make_model()
        handle = zerocomm.attach(model, mode=mode, expert_filter=is_expert_param, expert_group=egroup, bucket_mb=0.03)
        for u in handle.units:
            u.sched.set_debug_delay(delay)
        handle.enable_tracing()
        _perturb_owned(handle, 0)
        _apply_expected(handle, ref, 0)
        handle.launch()
        y = model(_input(0))
        handle.synchronize()
        _assert_params_equal(model, ref, f"{mode} delayed")
        assert torch.equal(y, ref(_input(0)))

        spans = handle.trace()
        assert {s.lane for s in spans} <= {"comm", "wait", "compute"}
        comm = [s for s in spans if s.lane == "comm"]
        compute = {s.label: s for s in spans if s.lane == "compute"}
        n_buckets = sum(len(u.plan.buckets) for u in handle.units)
        assert len(comm) == n_buckets, (len(comm), n_buckets)
        assert all(s.duration >= delay * 0.9 for s in comm), [s.duration for s in comm]
        first = handle.plan.blocks[0].name
        assert first == "wte"
        last_end = max(s.end for s in comm)
        # overlap: the first block ran (started AND finished) while later buckets were in flight
        assert compute[first].start < last_end
        assert compute[first].end < last_end - delay / 2, (compute[first], last_end)
        # ordering: no block finished before the buckets it needs had arrived
        comm_by_label = {s.label: s for s in comm}
        for u in handle.units:
            for blk, buckets in zip(u.plan.blocks, u.plan.block_buckets):
                for b in buckets:
                    lab = next(c for c in comm_by_label if c.startswith(f"{u.name}:{b}["))
                    assert compute[blk.name].end >= comm_by_label[lab].end, (mode, blk.name, lab)
        st = handle.stats()
        assert st["sync_total_s"] >= n_buckets * delay * 0.9 / 2, st  # two comm threads in parallel
        assert st["sync_exposed_s"] > 0, st
        res[mode] = (st["sync_total_s"], st["sync_exposed_s"], compute[first].end, last_end)
        handle.close()
    return res


def _skip_forward(self, idx: torch.Tensor) -> torch.Tensor:
    """blocks[0] twice, blocks[1] skipped."""
    T = idx.size(1)
    x = self.wte(idx) + self.wpe(torch.arange(T))
    x = self.blocks[0](x)
    x = self.blocks[0](x)
    for block in self.blocks[2:]:
        x = block(x)
    return self.head(self.ln_f(x))


def _make_skip_model() -> nn.Module:
    from zerocomm.testing.models import TinyGPT

    cls = type("SkipGPT", (TinyGPT,), {"forward": _skip_forward})
    return _make_model(cls)


def _job_hooks(rank: int, world: int) -> dict:
    import zerocomm
    from zerocomm.testing.models import is_expert_param

    egroup = dist.new_group(ranks=list(range(world)))
    res = {}
    for mode in MODES:
        model, ref = _make_skip_model(), _make_skip_model()
        handle = zerocomm.attach(model, mode=mode, expert_filter=is_expert_param, expert_group=egroup, bucket_mb=0.01)
        handle.enable_tracing()
        # before the first launch hooks only learn the order: no waits
        for _ in range(2):
            assert torch.equal(model(_input(0)), ref(_input(0)))
        assert not [s for s in handle.trace() if s.lane == "wait"]
        handle.clear_trace()

        for u in handle.units:  # make "skipped but still in flight" observable
            u.sched.set_debug_delay(0.02)
        _perturb_owned(handle, 0)
        _apply_expected(handle, ref, 0)
        handle.launch()
        y = model(_input(1))
        # the root post-hook ordered the skipped block's buckets: no synchronize needed yet
        skipped = dict(model.blocks[1].named_parameters())
        want = dict(ref.blocks[1].named_parameters())
        assert all(torch.equal(skipped[n], want[n]) for n in skipped), f"{mode}: skipped block stale"
        handle.synchronize()
        _assert_params_equal(model, ref, f"{mode} skip")
        assert torch.equal(y, ref(_input(1)))
        waited = {s.label for s in handle.trace() if s.lane == "wait"}
        blk1 = [b for b in handle.plan.blocks if b.name == "blocks.1"][0]
        assert any(w.startswith("dense:") for w in waited)
        res[mode] = sorted(waited), blk1.name
        handle.close()
    return res


def _job_errors(rank: int, world: int) -> bool:
    import zerocomm

    model = _make_model()
    with pytest.raises(ValueError, match="unknown mode"):
        zerocomm.attach(model, mode="scatter")
    h = zerocomm.attach(model, mode="broadcast", bucket_mb=0.01)
    with pytest.raises(ValueError, match="already has a zerocomm handle"):
        zerocomm.attach(model, mode="allgather")
    h.close()
    h2 = zerocomm.attach(model, mode="allgather", bucket_mb=0.01)  # attach after close works
    ref = _make_model()
    _perturb_owned(h2, 0)
    _apply_expected(h2, ref, 0)
    h2.launch()
    y = model(_input(0))
    h2.synchronize()
    _assert_params_equal(model, ref, "world 1")
    assert torch.equal(y, ref(_input(0)))
    h2.close()
    return True


# ----------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sync_both_modes(world):
    # 4 ranks: two expert-data groups [0,1] and [2,3]
    res = run_ranks(_job_sync, world, world == 4, False, 0.01, timeout=120)
    for mode in MODES:
        assert len({r[mode]["dense"] for r in res}) == 1, f"{mode}: dense params differ across ranks"
        half = world // 2 if world == 4 else world
        for lo in range(0, world, half):
            assert len({r[mode]["expert"] for r in res[lo : lo + half]}) == 1
        if world == 4:  # different expert groups, different owners -> different values
            assert res[0][mode]["expert"] != res[2][mode]["expert"]


def test_zero_copy_both_modes():
    res = run_ranks(_job_sync, 2, False, True, 0.01, timeout=120)
    for mode in MODES:
        assert res[0][mode] == res[1][mode]


def test_overlap_and_ordering_traced():
    res = run_ranks(_job_overlap, 2, timeout=120)
    assert all(len(r) == 2 for r in res)


def test_hooks_idle_before_launch_and_skipped_block():
    res = run_ranks(_job_hooks, 2, timeout=120)
    assert res[0] == res[1]


def test_errors_single_rank():
    assert run_ranks(_job_errors, 1, timeout=90) == [True]


def test_not_initialised_in_process():
    import zerocomm

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialised"):
        zerocomm.attach(_make_model(), mode="broadcast")
