"""The sharded optimizer's side of each bucket record: how a mode keeps,
reduces and binds one bucket's gradients, which part of it this rank
steps, and how the stepped values get back to what the sync moves.

Each mode is one class ([Note: one bucket record] in docs/design.md):

- `BroadcastGrads`: whole parameters per owner rank; gradients reduced to
  the owner, which steps the parameters themselves (or fp32 masters).
- `AllGatherGrads`: every bucket split evenly; gradients reduce-scattered
  in place, this rank steps its slice of the parameter flat itself.
- `ShardedGrads` (ZeRO-2, `shard_grads=True`): as `AllGatherGrads`, but
  only this rank's reduced slice is kept; the full bucket lives in a small
  pool of staging buffers while in flight.

Lean by default ([Note: gradient views]): until its bucket is handed to
the reduction `p.grad` is a view of the bucket's gradient buffer, so
backward accumulates straight into what the reduction reads, the
reduce-scatter's output is this rank's slice of that buffer, and the local
optimizer's gradients are views of it too; from hand-over until
zero_grad() `p.grad` is a `HandedOver` marker ([Note: handed-over
gradients]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from . import guards
from ._ext import _C
from .handed_over import IN_PLACE, SHARDED, HandedOver
from .plan import Bucket
from .sync_unit import BucketRecord, SyncUnit, alias

Collective = _C.Collective
STAGING_SLOTS = 2  # ZeRO-2: full-size gradient buckets in flight per unit and dtype
GRAD_ALIGN_BYTES = 16  # each bucket's gradient flat starts this aligned inside its store


@dataclass
class Widening:
    """One run of this rank's reduced gradients in a gradient store, and its
    master_dtype copy ([Note: master gradient in the bucket])."""

    src: torch.Tensor  # the reduced gradients (bucket dtype)
    dst: torch.Tensor  # their master_dtype copy: the local optimizer's gradients
    forward: bool  # in place: widen first element first (dst ends where src ends)
    in_place: bool  # dst overlays src and the dead gradients beside it


def place_widened(runs: list[tuple[int, int]], item: int, width: int, nbytes: int) -> list[tuple[int, bool] | None]:
    """Where each run [a, b) (elements of `item` bytes) of a gradient store of
    `nbytes` gets its `width`-byte copy: (byte offset, forward) or None.

    Two placements are safe to widen in place through a scratch, chunk by
    chunk ([Note: master gradient in the bucket]): ending where the run ends
    (dst at or below src: first chunk first) or starting where it starts
    (dst at or above src: last chunk first). Either may only cover dead
    gradients: no other run, no other copy. The last run may start where it
    starts and reach past the store's end (the store grows by the rest)."""
    own = [(a * item, b * item) for a, b in runs]
    taken: list[tuple[int, int]] = list(own)
    out: list[tuple[int, bool] | None] = []
    for k, (s, e) in enumerate(own):
        need = (e - s) // item * width
        choice: tuple[int, bool] | None = None
        for d, fwd in ((e - need, True), (s, False)):
            last = k == len(own) - 1
            if width < item or d < 0 or d % width or (d + need > nbytes and not (last and not fwd)):
                continue
            if all(d + need <= x or y <= d for x, y in taken if (x, y) != (s, e)):
                choice = (d, fwd)
                break
        if choice is not None:
            taken.append((choice[0], choice[0] + need))
        out.append(choice)
    return out


@dataclass
class LocalParam:
    """One tensor the local optimizer steps, and where it comes from."""

    tensor: torch.Tensor  # what the local optimizer sees (a Parameter)
    index: int  # index of the model parameter in the user's optimizer order
    start: int  # element offset inside that parameter (allgather pieces)
    numel: int
    group: int  # the user's param group
    param: int  # plan param index
    at: int  # element offset inside the bucket's flat buffer
    user_grad: torch.Tensor | None = None  # model param's own grad, while borrowed


@dataclass
class ModeContext:
    """What every mode needs to build its locals."""

    index_of: dict[int, int]  # id(param) -> index in the user's optimizer order
    group_of: dict[int, int]  # id(param) -> the user's param group
    master_dtype: torch.dtype | None
    device: torch.device
    average: bool


GradWatchRecord = Callable[[str, torch.Tensor, "torch.Tensor | None"], None]


class GradMode:
    """One unit's gradient buckets in one mode (see the module docstring)."""

    keeps_grads = True  # the bucket's views hold the gradients from landing until the step
    WHY = IN_PLACE  # what a handed-over marker says ([Note: handed-over gradients])
    SCRATCH = 1 << 16  # elements of the master_dtype widening's scratch (256 KiB fp32)

    def __init__(self, unit: SyncUnit, ctx: ModeContext) -> None:
        self.unit = unit
        self.ctx = ctx
        self._stores: dict[torch.dtype, torch.Tensor] = {}  # dtype -> every bucket's gradients, back to back
        self._offsets: dict[int, int] = {}  # bucket index -> element offset in its dtype's store
        self._widenings: list[Widening] = []
        self._markers: dict[int, HandedOver] = {}  # plan param index -> its p.grad once handed over
        md = ctx.master_dtype or torch.float32
        self._scratch = torch.empty(0, dtype=md, device=ctx.device)
        for rec in unit.buckets:
            self.build(rec)
        shared = [w for w in self._widenings if w.in_place]
        if shared:
            n = min(self.SCRATCH, max(w.src.numel() for w in shared))
            self._scratch = torch.empty(n, dtype=md, device=ctx.device)

    # -- construction ---------------------------------------------------------
    def build(self, rec: BucketRecord) -> None:
        raise NotImplementedError

    def own_range(self, rec: BucketRecord) -> tuple[int, int] | None:
        """[start, end) of the elements of the bucket's gradient flat whose
        reduced values this rank steps (None: it steps none of them)."""
        raise NotImplementedError

    def _grad_buffer(self, rec: BucketRecord) -> torch.Tensor:
        """A persistent gradient flat with a view per parameter (p.grad's):
        a piece of its dtype's store, with a version counter of its own."""
        b, plan = rec.spec, self.unit.plan
        store = self._stores.get(b.dtype)
        if store is None:
            store = self._stores[b.dtype] = self._make_store(b.dtype)
        flat = alias(store.narrow(0, self._offsets[b.index], b.padded_numel))
        rec.grad_flat = flat
        rec.grad_views = [
            flat.narrow(0, off, plan.params[i].numel).view(plan.params[i].shape) for i, off in zip(b.params, b.offsets)
        ]
        return flat

    def _replica(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """add_grad_bucket's replica stage for `t`, what this rank keeps of
        the reduced bucket: all-reduced across the replicas of its shard
        after the shard group's reduction ([Note: hierarchical layout])."""
        return {"replica": t} if self.unit.transport.replica is not None else {}

    def _make_store(self, dtype: torch.dtype) -> torch.Tensor:
        """[Note: master gradient in the bucket] One gradient store per dtype
        holding every bucket's flat back to back (as Megatron's grad buffer),
        so that with `master_dtype` the widened copy of each run of this
        rank's reduced gradients can be placed over its own run and the dead
        gradients of the buckets or slices beside it."""
        recs = [r for r in self.unit.buckets if r.spec.dtype == dtype]
        align = max(1, GRAD_ALIGN_BYTES // dtype.itemsize)
        n = 0
        for r in recs:
            self._offsets[r.index] = n
            n += -(-r.spec.padded_numel // align) * align
        md = self.ctx.master_dtype
        runs: list[tuple[int, int]] = []  # this rank's own elements, adjacent ranges merged
        for r in recs:
            own = self.own_range(r)
            if own is None:
                continue
            a, b = self._offsets[r.index] + own[0], self._offsets[r.index] + own[1]
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        widen = md is not None and md != dtype
        places: list[tuple[int, bool] | None] = []
        end = n * dtype.itemsize
        if widen:
            assert md is not None
            places = place_widened(runs, dtype.itemsize, md.itemsize, end)
            end = max([end] + [pl[0] + (b - a) * md.itemsize for (a, b), pl in zip(runs, places) if pl is not None])
        store = torch.zeros(-(-end // dtype.itemsize), dtype=dtype, device=self.ctx.device)
        if not widen:
            return store
        assert md is not None
        for (a, b), pl in zip(runs, places):
            src = store.narrow(0, a, b - a)
            if pl is None:  # no dead memory beside it: a buffer of its own
                dst = torch.zeros(b - a, dtype=md, device=self.ctx.device)
            else:
                dst = torch.empty(0, dtype=md, device=self.ctx.device).set_(
                    store.untyped_storage(), pl[0] // md.itemsize, (b - a,), (1,)
                )
            w = Widening(src, dst, pl is not None and pl[1], pl is not None)
            self._widenings.append(w)
            for r in recs:
                own = self.own_range(r)
                if own is not None and a <= self._offsets[r.index] + own[0] < b:
                    r.master_grad = dst.narrow(0, self._offsets[r.index] + own[0] - a, own[1] - own[0])
        return store

    def _widen(self, w: Widening) -> None:
        """This rank's reduced gradients -> their master_dtype copy. In place,
        through the small scratch in chunks ordered so that no chunk
        overwrites an element not yet read (see `place_widened`)."""
        if not w.in_place:
            w.dst.copy_(w.src)
            return
        n = w.src.numel()
        chunk = self._scratch.numel()
        starts = list(range(0, n, chunk))
        if not w.forward:
            starts.reverse()
        for a in starts:
            k = min(chunk, n - a)
            tmp = self._scratch.narrow(0, 0, k)
            tmp.copy_(w.src.narrow(0, a, k))
            w.dst.narrow(0, a, k).copy_(tmp)

    def bind_all(self, has_grad: list[bool]) -> None:
        """Every reduction of the step has landed: widen this rank's
        gradients once, then bind every bucket."""
        for w in self._widenings:
            self._widen(w)
        for rec in self.unit.buckets:
            self.bind(rec, has_grad)

    def _local(self, rec: BucketRecord, t: torch.Tensor, i: int, start: int, numel: int, at: int) -> LocalParam:
        p = self.unit.plan.params[i].param
        return LocalParam(t, self.ctx.index_of[id(p)], start, numel, self.ctx.group_of[id(p)], i, at)

    # -- backward -------------------------------------------------------------
    def land(self, rec: BucketRecord, k: int, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of the bucket's k-th parameter: its
        gradient moves into the bucket (once per step: afterwards backward
        accumulates into the view in place)."""
        view = rec.grad_views[k]
        g = p.grad
        if g is None or g is view:
            return
        assert view is not None
        view.copy_(g)
        p.grad = view  # autograd's tensor is freed here

    def hand_over(self, rec: BucketRecord, fired: set[int], record: GradWatchRecord) -> None:
        """Launch the bucket's reduction (every parameter has landed, or the
        step flushes it). Parameters without a gradient contribute zeros;
        p.grad of the others becomes a marker ([Note: handed-over
        gradients]): the bucket is reduced in place from here on."""
        plan = self.unit.plan
        had = []
        for k, i in enumerate(rec.spec.params):
            spec = plan.params[i]
            view = rec.grad_views[k]
            assert view is not None
            g = self._current(i)
            had.append(g is not None)
            if g is None:
                view.zero_()
            elif g is not view:  # set after its hook fired (or none fired: no_sync edge)
                view.copy_(g)
        self.unit.sched.reduce_grads(rec.grad_id, [], self.ctx.average)
        for i, h in zip(rec.spec.params, had):
            if h:  # a parameter without a gradient keeps None (or its zeroed marker), as in torch
                spec = plan.params[i]
                record(spec.name, spec.param, self._mark(i))

    def _current(self, i: int) -> torch.Tensor | None:
        """The plan's i-th parameter's gradient at hand-over: None when it
        has none, a zeroed marker counts as None; a marker a step has used
        means backward never reached the parameter since (torch would step
        with that old gradient again, which zerocomm no longer has)."""
        spec = self.unit.plan.params[i]
        g = spec.param.grad
        if isinstance(g, HandedOver):
            if g.stale and not g.zeroed:
                raise guards.stale_gradient(spec.name)
            return None
        return g

    def _mark(self, i: int) -> HandedOver:
        """p.grad of the plan's i-th parameter from its hand-over until
        zero_grad(): one marker per parameter, renewed every hand-over."""
        spec = self.unit.plan.params[i]
        marker = self._markers.get(i)
        if marker is None:
            marker = self._markers[i] = HandedOver(spec.param, spec.name, self.WHY)
        marker.renew()
        spec.param.grad = marker
        return marker

    def after_wait(self) -> None:
        """Every reduction of the step has been waited for."""

    def new_step(self) -> None:
        """The step's gradients are done with (step() or zero_grad()): from
        here on a backward into a handed-over gradient would add to what
        torch still holds ([Note: handed-over gradients])."""
        for marker in self._markers.values():
            marker.stale = True

    def take_local(self, rec: BucketRecord) -> None:
        """[Note: DDP-wrapped models] p.grad is already averaged over the
        ranks: copy this rank's part into the reduced-gradient buffers."""
        raise NotImplementedError

    # -- step -----------------------------------------------------------------
    def bind(self, rec: BucketRecord, has_grad: list[bool]) -> None:
        """Point each local tensor's .grad at its reduced gradient; None
        where no rank had a gradient (torch's optimizers skip those)."""
        raise NotImplementedError

    def unbind(self, rec: BucketRecord) -> None:
        """A model parameter stepped in place gets its own grad back."""
        for lp in rec.locals:
            lp.tensor.grad, lp.user_grad = lp.user_grad, None

    def write_back(self, rec: BucketRecord) -> None:
        """This rank's stepped values -> what the sync moves."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Gradient buffers and master copies this mode holds on this rank."""
        n = sum(t.untyped_storage().nbytes() for t in self._stores.values())
        n += sum(w.dst.numel() * w.dst.element_size() for w in self._widenings if not w.in_place)
        for rec in self.unit.buckets:
            m = rec.master
            if m is not None and m.untyped_storage().data_ptr() != rec.param_flat.untyped_storage().data_ptr():
                n += m.numel() * m.element_size()
        return n


class BroadcastGrads(GradMode):
    """Reduce to the owner; the owner steps whole parameters."""

    def build(self, rec: BucketRecord) -> None:
        u, b = self.unit, rec.spec
        flat = self._grad_buffer(rec)
        assert b.owner is not None
        empty = torch.empty(0, dtype=b.dtype, device=self.ctx.device)
        reduced = alias(flat)  # the owner keeps the whole reduced bucket
        rec.grad_id = u.sched.add_grad_bucket(
            reduced,
            empty,
            [],
            [],
            b.owner,
            f"grad:{u.name}:{b.index}",
            Collective.REDUCE,
            **(self._replica(reduced) if b.owner == u.rank else {}),
        )
        if b.owner != u.rank:
            return
        md = self.ctx.master_dtype
        for i, off in zip(b.params, b.offsets):
            p = u.plan.params[i].param
            t = p if md is None or md == b.dtype else nn.Parameter(p.detach().to(md).clone())
            rec.locals.append(self._local(rec, t, i, 0, p.numel(), off))

    def own_range(self, rec: BucketRecord) -> tuple[int, int] | None:
        return (0, rec.spec.padded_numel) if rec.spec.owner == self.unit.rank else None

    def take_local(self, rec: BucketRecord) -> None:
        if rec.spec.owner != self.unit.rank:
            return
        for k, i in enumerate(rec.spec.params):
            g, view = self.unit.plan.params[i].param.grad, rec.grad_views[k]
            assert view is not None
            if g is None:
                view.zero_()
            elif g is not view:
                view.copy_(g)

    def bind(self, rec: BucketRecord, has_grad: list[bool]) -> None:
        for k, lp in enumerate(rec.locals):
            spec = self.unit.plan.params[lp.param]
            view = rec.grad_views[k]
            assert view is not None
            if lp.tensor is spec.param and lp.user_grad is None:
                lp.user_grad = lp.tensor.grad  # handed back after the step
            if not has_grad[lp.param]:
                lp.tensor.grad = None
            elif rec.master_grad is None:
                lp.tensor.grad = view
            else:  # widened by bind_all
                lp.tensor.grad = rec.master_grad.narrow(0, lp.at, lp.numel).view(spec.shape)

    def write_back(self, rec: BucketRecord) -> None:
        for lp in rec.locals:
            p = self.unit.plan.params[lp.param].param
            if lp.tensor is not p:
                p.detach().copy_(lp.tensor)


class AllGatherGrads(GradMode):
    """Reduce-scatter in place; this rank steps its slice of every bucket."""

    def build(self, rec: BucketRecord) -> None:
        u, b = self.unit, rec.spec
        flat = alias(self._grad_buffer(rec))
        # the reduce-scatter's output is this rank's slice of the bucket itself
        shard = flat.narrow(0, rec.lo, b.shard_numel)
        rec.grad_id = u.sched.add_grad_bucket(
            flat, shard, [], [], -1, f"grad:{u.name}:{b.index}", Collective.REDUCE_SCATTER, **self._replica(shard)
        )
        rec.grad_shard = shard
        self._build_master(rec)

    def own_range(self, rec: BucketRecord) -> tuple[int, int] | None:
        return (rec.lo, rec.lo + rec.spec.shard_numel)

    def _build_master(self, rec: BucketRecord) -> None:
        b, lo = rec.spec, rec.lo
        flat_shard = rec.param_flat.narrow(0, lo, b.shard_numel)
        md = self.ctx.master_dtype
        # Same dtype: the sync buffer's own slice IS the master (the
        # all-gather leaves it in place); otherwise a master_dtype copy (its
        # gradient: placed by the gradient store, or ZeRO-2's kept slice).
        if md is None or md == b.dtype:
            rec.master = flat_shard
        else:
            rec.master = flat_shard.detach().to(md).clone()
        plan = self.unit.plan
        for pc in plan.pieces(b, lo, lo + b.shard_numel):
            piece = nn.Parameter(rec.master.narrow(0, pc.at - lo, pc.numel))  # shares storage
            rec.locals.append(self._local(rec, piece, pc.param, pc.start, pc.numel, pc.at))

    def take_local(self, rec: BucketRecord) -> None:
        shard = rec.grad_shard
        assert shard is not None
        shard.zero_()
        for lp in rec.locals:
            g = self.unit.plan.params[lp.param].param.grad
            if g is not None:
                shard.narrow(0, lp.at - rec.lo, lp.numel).copy_(g.detach().reshape(-1).narrow(0, lp.start, lp.numel))

    def bind(self, rec: BucketRecord, has_grad: list[bool]) -> None:
        shard = rec.master_grad if rec.master_grad is not None else rec.grad_shard  # widened by bind_all
        assert shard is not None
        for lp in rec.locals:
            lp.tensor.grad = shard.narrow(0, lp.at - rec.lo, lp.numel) if has_grad[lp.param] else None

    def write_back(self, rec: BucketRecord) -> None:
        assert rec.master is not None
        flat_shard = rec.param_flat.narrow(0, rec.lo, rec.master.numel())
        if rec.master.data_ptr() != flat_shard.data_ptr():
            flat_shard.copy_(rec.master)


@dataclass
class _Slot:
    """One staging buffer of the ZeRO-2 pool and the bucket using it."""

    buf: torch.Tensor
    user: BucketRecord | None = None  # launched, not yet retired


class ShardedGrads(AllGatherGrads):
    """ZeRO-2: after its reduce-scatter only this rank's slice of a bucket is
    kept (gradients 1/N + the buckets in flight). p.grad is released once
    handed over (a `HandedOver` marker takes its place), and every backward
    reduces (gradient accumulation reduces each micro-batch, adding into the
    kept slice)."""

    keeps_grads = False
    WHY = SHARDED

    def __init__(self, unit: SyncUnit, ctx: ModeContext) -> None:
        self._pools: dict[torch.dtype, list[_Slot]] = {}
        self._slot_of: dict[int, _Slot] = {}  # bucket index -> its staging slot
        self._reduced: set[int] = set()  # buckets whose kept slice holds this step's first reduction
        super().__init__(unit, ctx)

    def build(self, rec: BucketRecord) -> None:
        u, b = self.unit, rec.spec
        same = [r for r in u.buckets if r.spec.dtype == b.dtype]
        if b.dtype not in self._pools:  # the biggest bucket of the dtype fits every slot
            need = max(r.spec.padded_numel for r in same)
            n = min(STAGING_SLOTS, len(same))
            self._pools[b.dtype] = [_Slot(torch.zeros(need, dtype=b.dtype, device=self.ctx.device)) for _ in range(n)]
        slots = self._pools[b.dtype]
        # slots are taken in backward order (the reverse of the buckets')
        pos = sum(1 for r in same if r.index > rec.index)
        slot = slots[pos % len(slots)]
        self._slot_of[rec.index] = slot
        staging = alias(slot.buf.narrow(0, 0, b.padded_numel))
        numels = [u.plan.params[i].numel for i in b.params]
        kept = staging.narrow(0, rec.lo, b.shard_numel)
        rec.grad_id = u.sched.add_grad_bucket(
            staging,
            kept,
            list(b.offsets),
            numels,
            -1,
            f"grad:{u.name}:{b.index}",
            Collective.REDUCE_SCATTER,
            **self._replica(kept),
        )
        rec.grad_views = [None] * len(b.params)
        md = self.ctx.master_dtype
        # the kept slice is in master_dtype when there is one: the reduced
        # slices are added up there, and it is the master's gradient itself
        keep = md if md is not None else b.dtype
        rec.grad_shard = torch.zeros(b.shard_numel, dtype=keep, device=self.ctx.device)
        self._build_master(rec)
        if md is not None and md != b.dtype:
            rec.master_grad = rec.grad_shard

    def land(self, rec: BucketRecord, k: int, p: torch.Tensor) -> None:
        pass  # the gradient is copied into a staging buffer at hand-over

    def hand_over(self, rec: BucketRecord, fired: set[int], record: GradWatchRecord) -> None:
        slot = self._slot_of[rec.index]
        if slot.user is not None:
            self._retire(slot.user)  # the slot's previous bucket is reduced and kept
        plan = self.unit.plan
        grads, had = [], []
        for i in rec.spec.params:
            g = self._current(i)
            had.append(g is not None)
            grads.append(g.detach() if g is not None else torch.zeros_like(plan.params[i].param))
        self.unit.sched.reduce_grads(rec.grad_id, grads, self.ctx.average)
        slot.user = rec
        for i, fresh in zip(rec.spec.params, had):  # copied: released, so the full gradient never lives on
            if fresh:  # a parameter without a gradient keeps None (or its earlier marker), as in torch
                record(plan.params[i].name, plan.params[i].param, self._mark(i))

    def _retire(self, rec: BucketRecord) -> None:
        """Wait for the bucket's reduction and keep (add up) its slice."""
        self.unit.sched.wait_grad(rec.grad_id)
        slot = self._slot_of[rec.index]
        reduced = slot.buf.narrow(0, rec.lo, rec.spec.shard_numel)
        assert rec.grad_shard is not None
        if rec.index in self._reduced:
            rec.grad_shard.add_(reduced)
        else:
            rec.grad_shard.copy_(reduced)
            self._reduced.add(rec.index)
        slot.user = None

    def after_wait(self) -> None:
        for slots in self._pools.values():
            for slot in slots:
                if slot.user is not None:
                    self._retire(slot.user)
        # buckets never reduced this step (no backward): their kept slice is zero
        for rec in self.unit.buckets:
            if rec.index not in self._reduced and rec.grad_shard is not None:
                rec.grad_shard.zero_()

    def new_step(self) -> None:  # noqa: D102
        super().new_step()
        # a step abandoned after its reductions were launched: they must
        # finish before their staging buffers are reused, and not count
        for slots in self._pools.values():
            for slot in slots:
                if slot.user is not None:
                    self.unit.sched.wait_grad(slot.user.grad_id)
                    slot.user = None
        self._reduced.clear()

    def nbytes(self) -> int:
        n = super().nbytes()
        for rec in self.unit.buckets:
            if rec.grad_shard is not None:
                n += rec.grad_shard.numel() * rec.grad_shard.element_size()
        for slots in self._pools.values():
            n += sum(s.buf.numel() * s.buf.element_size() for s in slots)
        return n


def mode_class(bucket: Bucket, shard_grads: bool) -> type[GradMode]:
    """The one place a bucket's mode is chosen: a broadcast bucket has an
    owner rank, an allgather bucket none."""
    if bucket.owner is not None:
        return BroadcastGrads
    return ShardedGrads if shard_grads else AllGatherGrads


class ShardBuffers:
    """Every unit's gradient mode, over the units' bucket records."""

    def __init__(self, units: list[SyncUnit], ctx: ModeContext, shard_grads: bool) -> None:
        self.units = units
        self.modes: list[GradMode] = []
        for u in units:
            cls = mode_class(u.plan.buckets[0], shard_grads) if u.plan.buckets else AllGatherGrads
            self.modes.append(cls(u, ctx))

    def locals(self, ui: int | None = None) -> list[LocalParam]:
        """Every local tensor (of one unit), in unit and bucket order."""
        units = range(len(self.units)) if ui is None else [ui]
        return [lp for u in units for rec in self.units[u].buckets for lp in rec.locals]

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.modes)

    def release_grads(self) -> None:
        """close(): a p.grad still viewing a bucket (accumulated, not yet
        handed over) gets its own copy, so the buckets can be freed; a
        handed-over marker becomes None (the plain model's hooks could not
        drop it before a backward)."""
        for u in self.units:
            for rec in u.buckets:
                for k, i in enumerate(rec.spec.params):
                    p = u.plan.params[i].param
                    if isinstance(p.grad, HandedOver):
                        p.grad = None
                    elif p.grad is not None and p.grad is rec.grad_views[k]:
                        p.grad = p.grad.clone()

    def bind_grads(self, has_grad: list[list[bool]]) -> None:
        for ui, m in enumerate(self.modes):
            m.bind_all(has_grad[ui])

    def unbind_grads(self) -> None:
        for u, m in zip(self.units, self.modes):
            for rec in u.buckets:
                m.unbind(rec)

    def write_back(self, ui: int, b: int) -> None:
        self.modes[ui].write_back(self.units[ui].buckets[b])
