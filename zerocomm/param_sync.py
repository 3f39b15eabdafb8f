"""ParamSync: after each optimizer step, deliver every rank's updated
parameters to all ranks, bucket by bucket on zerocomm's comm stream, while
the next forward pass already runs (docs/design.md, "Data flow of one step")."""
from __future__ import annotations

import atexit
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from . import telemetry
from ._ext import _C
from .blocks import BlocksArg
from .hooks import BlockHooks, Wait
from .plan import Bucket, Plan, build_plan
from .transport import SimulatedTransport, Transport, open_transport

ALL_GATHER = _C.ALL_GATHER  # a param bucket's root: in-place all-gather instead of a broadcast

# Handles still open at interpreter exit are closed first: a comm worker
# thread left running into C++ static destruction aborts the process.
_OPEN_HANDLES: "weakref.WeakSet[ParamSync]" = weakref.WeakSet()


@atexit.register
def _close_open_handles() -> None:
    for handle in list(_OPEN_HANDLES):
        try:
            handle.close()  # joins the comm worker and the watchdog thread
        except Exception:  # one handle's failure must not leave the others open
            pass


class PlannedUnit(NamedTuple):
    """A plan and the group it syncs over, before any transport exists."""

    name: str  # "dense" or "expert"
    group: dist.ProcessGroup
    plan: Plan


def plan_units(
    chunks: list[nn.Module], *, mode: str, group: dist.ProcessGroup, expert_group: dist.ProcessGroup | None,
    expert_filter: Callable[[str, nn.Parameter], bool] | None, transport: str | SimulatedTransport,
    partition: str, bucket_mb: float, align_bytes: int, blocks: BlocksArg,
) -> list[PlannedUnit]:
    """The plans of one attach, built once: the dense plan, and the expert
    plan (its own group) when `expert_filter` picks expert parameters.
    Collective-free, so attach fingerprints them before any collective."""
    specs = [("dense", group, None if expert_filter is None else (lambda n, p: not expert_filter(n, p)))]
    if expert_filter is not None:
        specs.append(("expert", expert_group if expert_group is not None else group, expert_filter))
    out = []
    for name, grp, pfilter in specs:
        world = 1 if isinstance(transport, SimulatedTransport) else dist.get_world_size(grp)
        plan = build_plan(chunks, mode=mode, world_size=world, partition=partition, bucket_mb=bucket_mb,
                          align_bytes=align_bytes, blocks=blocks, param_filter=pfilter)
        out.append(PlannedUnit(name, grp, plan))
    return out


@dataclass
class SyncUnit:
    """One plan (dense or expert) with its own transport and scheduler."""

    name: str
    plan: Plan
    transport: Transport
    sched: "_C.SyncScheduler"
    flats: list[torch.Tensor]
    group: dist.ProcessGroup | None = None  # the user's group it syncs over
    order: list[int] = field(default_factory=list)  # bucket launch order
    # per plan param: the storage the scheduler copies from/into (the
    # parameter's own at attach, or its slice of the flat buffer with
    # zero_copy); a parameter rebound elsewhere is put back on it
    bound: list[torch.Tensor] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.transport.rank

    def shard_range(self, b: Bucket) -> tuple[int, int]:
        """[start, end) of this rank's slice of an allgather bucket."""
        return b.shard_range(self.rank)


def owned_pieces(b: Bucket, plan: Plan, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(param index, start inside the param, start inside the flat buffer) of
    every piece of a parameter that falls into [lo, hi) of bucket `b`
    (kept for custom loops; `plan.pieces` also gives each piece's length)."""
    return [(pc.param, pc.start, pc.at) for pc in plan.pieces(b, lo, hi)]


def _piece(p: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return p.detach().view(-1).narrow(0, start, n)


def build_unit(
    name: str,
    plan: Plan,
    transport: Transport,
    device: torch.device,
    zero_copy: bool,
    copy_in_params: bool,
) -> SyncUnit:
    """Allocates the persistent flat buffers and registers each bucket with
    the scheduler. `copy_in_params=False` when the owner writes its shard
    straight into the flat buffer (the sharded optimizer does)."""
    sched = _Scheduler(transport.stream, transport.comm, int(transport.timeout_s * 1000))
    rank, flats = transport.rank, []
    for b in plan.buckets:
        flat = torch.zeros(b.padded_numel, dtype=b.dtype, device=device)
        params = [plan.params[i].param for i in b.params]
        for p, off in zip(params, b.offsets):
            flat.narrow(0, off, p.numel()).copy_(p.detach().view(-1))
        copy_in: list[torch.Tensor] = []
        in_offsets: list[int] = []
        if plan.mode == "broadcast":
            root = b.owner
            if rank == root and copy_in_params and not zero_copy:
                copy_in, in_offsets = [p.detach() for p in params], list(b.offsets)
            copy_out = [] if rank == root else [p.detach() for p in params]
        else:
            root = ALL_GATHER
            if copy_in_params and not zero_copy:
                for pc in plan.pieces(b, *b.shard_range(rank)):
                    copy_in.append(_piece(plan.params[pc.param].param, pc.start, pc.numel))
                    in_offsets.append(pc.at)
            copy_out = [p.detach() for p in params]
        if zero_copy:
            # Parameters become views of the flat buffer: no copy-in/out.
            for p, off in zip(params, b.offsets):
                p.data = flat.narrow(0, off, p.numel()).view(p.shape)
            copy_out = []
        out_offsets = list(b.offsets) if copy_out else []
        label = f"{name}:{b.index}[{plan.blocks[b.blocks[0]].name}" + (
            f"..{plan.blocks[b.blocks[-1]].name}]" if len(b.blocks) > 1 else "]"
        )
        sched.add_param_bucket(flat, copy_in, in_offsets, copy_out, out_offsets, root, label)
        flats.append(flat)
    bound = [s.param.detach() for s in plan.params]
    return SyncUnit(name, plan, transport, sched, flats, order=list(range(len(plan.buckets))), bound=bound)


@dataclass
class _Slot:
    """Where a module holds a plan parameter (tied ones have several)."""

    module: nn.Module
    attr: str
    param: nn.Parameter
    name: str


def _slots(chunks: list[nn.Module], units: list[SyncUnit]) -> list[_Slot]:
    names = {id(s.param): s.name for u in units for s in u.plan.params}
    out = []
    for chunk in chunks:
        for m in chunk.modules():
            for attr, p in m.named_parameters(recurse=False):
                if id(p) in names:
                    out.append(_Slot(m, attr, p, names[id(p)]))
    return out


class _Closed:
    """Stands in for the scheduler of a closed handle (the sharded optimizer
    keeps its SyncUnits): any use raises instead of touching freed state."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError("this zerocomm handle is closed")


def _drain(u: SyncUnit, attempts: int = 3) -> None:
    """After a failure, wait (GIL released) until the comm worker has left
    the collective it may still be blocked in. After abort() the waits it
    can be in end at once (c10d works, simulated hold, debug delay) -- except
    gloo's reduce-scatter, which runs inside Work::wait and ends at the
    private backend's timeout -- so this normally returns at the first
    attempt; each attempt is bounded by the timeout, and the worker,
    poisoned, skips what follows."""
    for _ in range(attempts):
        try:
            u.sched.host_synchronize()
            return
        except Exception as e:
            if "timed out" not in str(e):
                return  # the worker reached the poisoned event: it is idle


class _Scheduler(_C.SyncScheduler):
    """The native scheduler, also holding a view of every buffer registered
    with it (param flats, grad flats and shards: all the communicator hands
    to gloo), so `_release` can order the teardown safely."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.buffers: list[torch.Tensor] = []

    def add_param_bucket(self, flat: torch.Tensor, *args: Any) -> int:
        self.buffers.append(flat.view(-1))
        return super().add_param_bucket(flat, *args)

    def add_grad_bucket(self, flat: torch.Tensor, shard: torch.Tensor, *args: Any) -> int:
        self.buffers += [flat.view(-1), shard.view(-1)]
        return super().add_grad_bucket(flat, shard, *args)


def _release(u: SyncUnit) -> None:
    """Destroy the scheduler, its comm stream and communicator now, in an
    order that cannot deadlock.

    Their destructors run under the GIL and join the gloo backend's threads.
    A backend thread that drops the second-to-last reference to a tensor
    that has a Python object must take the GIL (torch then releases the
    PyObject): if that happens while this thread holds the GIL and joins it,
    the process hangs forever -- seen right after a peer died, while gloo was
    still freeing the failed work. The views in `sched.buffers` keep one
    more C++ reference on every buffer gloo can hold (a view owns its base),
    so gloo's threads never drop the second-to-last one; the views go last,
    here, on this thread."""
    sched = u.sched
    keep = list(getattr(sched, "buffers", []))
    u.sched = cast(Any, _Closed())
    u.transport.stream = cast(Any, None)
    u.transport.comm = cast(Any, None)
    del sched  # ~SyncScheduler: joins the worker, then frees the communicator
    keep.clear()


class ParamSync:
    """Handle returned by `zerocomm.attach(model)` (no optimizer).

    Custom loops: update the parameters this rank owns (`plan.param_owner`,
    or the allgather shards), call `launch()`, run the next forward. Call
    `synchronize()` before reading parameters outside a forward pass.
    """

    def __init__(
        self,
        chunks: list[nn.Module],
        *,
        mode: str,
        units: list[PlannedUnit],
        transport: str | SimulatedTransport,
        timeout_s: float,
        high_priority: bool,
        zero_copy: bool,
        copy_in_params: bool,
        device: torch.device,
    ) -> None:
        self.chunks = chunks
        self.mode = mode
        self.device = device
        self.units: list[SyncUnit] = []
        self._closed = False
        self._launched = False
        self._first_calls: list[nn.Module] = []
        self.attached_to: list[nn.Module] = []  # models attach() marked with this handle
        for name, grp, plan in units:  # planned once, by attach (see plan_units)
            t = open_transport(grp, device, transport, timeout_s, high_priority)
            assert t.world_size == plan.world_size, (name, t.world_size, plan.world_size)
            unit = build_unit(name, plan, t, device, zero_copy, copy_in_params)
            unit.group = grp
            self.units.append(unit)
        waits: dict[nn.Module, list[Wait]] = {}
        for u in self.units:
            for blk, buckets in zip(u.plan.blocks, u.plan.block_buckets):
                waits.setdefault(blk.module, []).extend((u.sched, b) for b in buckets)
        roots: dict[nn.Module, set[Wait]] = {}
        for chunk in chunks:
            inside = {id(m) for m in chunk.modules()}
            roots[chunk] = {w for m, ws in waits.items() if id(m) in inside for w in ws}
        self._slots = _slots(chunks, self.units)
        self.hooks = BlockHooks(waits, roots, on_first_call=self._record_first_call)
        self.hooks.install()
        _OPEN_HANDLES.add(self)

    # -- public API -----------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The dense (non-expert) plan; `plans` has all of them."""
        return self.units[0].plan

    @property
    def plans(self) -> dict[str, Plan]:
        return {u.name: u.plan for u in self.units}

    def launch(self, before_bucket: Callable[[int, int], None] | None = None) -> None:
        """Enqueue the sync of every bucket, in forward order, after the work
        the compute stream has queued so far (the optimizer step).

        `before_bucket(unit, bucket)`, if given, runs just before each
        bucket is enqueued: the sharded optimizer steps that bucket's shard
        there, so its sync starts while later buckets are still stepping."""
        self._check_open()
        self.rebind_moved_params()
        if not self._launched:
            self._learn_forward_order()
            self._launched = True
        launched: list[Wait] = []
        for ui, b in self._sequence:
            u = self.units[ui]
            if before_bucket is not None:
                before_bucket(ui, b)
            u.sched.launch([b])
            launched.append((u.sched, b))
        self.hooks.arm(launched)

    def rebind_moved_params(self) -> list[str]:
        """[Note: user writes between steps] A parameter whose `.data` was
        rebound since attach (`p.data = p.data.clone()`, `p.data = new`)
        would leave the scheduler copying stale storage and the ranks would
        silently diverge: its new values are copied into the storage
        zerocomm syncs and the parameter is pointed back at it, as if the
        user had written in place. A module whose parameter object was
        replaced (`load_state_dict(..., assign=True)`, `setattr`) raises:
        neither zerocomm nor the user's optimizer would ever step the new
        one. Returns the names of the parameters put back."""
        for s in self._slots:
            if getattr(s.module, s.attr, None) is not s.param:
                raise RuntimeError(
                    f"zerocomm: parameter {s.name!r} was replaced by a new Parameter object after "
                    "attach (load_state_dict(..., assign=True) or setattr on the module); neither the "
                    "optimizer nor zerocomm would ever update the new one. Load or copy in place "
                    "instead (load_state_dict without assign=True, p.data.copy_(...)), or attach after "
                    "building the model"
                )
        moved: list[tuple[SyncUnit, int]] = []
        for u in self.units:
            for i, (spec, bound) in enumerate(zip(u.plan.params, u.bound)):
                p = spec.param
                if p.data_ptr() == bound.data_ptr() and p.shape == bound.shape:
                    continue
                if p.shape != bound.shape or p.dtype != bound.dtype or p.device != bound.device:
                    raise RuntimeError(
                        f"zerocomm: parameter {spec.name!r} was rebound after attach to a tensor of "
                        f"shape {tuple(p.shape)}, {p.dtype} on {p.device} (attached as "
                        f"{tuple(bound.shape)}, {bound.dtype} on {bound.device}); zerocomm's buffers "
                        "cannot follow: close() and attach again"
                    )
                moved.append((u, i))
        if moved:
            for u in self.units:
                u.sched.synchronize()  # the sync may still write the old storage
            for u, i in moved:
                p, bound = u.plan.params[i].param, u.bound[i]
                bound.copy_(p.detach())
                p.data = bound
        return [u.plan.params[i].name for u, i in moved]

    def synchronize(self) -> None:
        """The current stream waits for every launched sync (CPU: the host
        waits). Call before reading parameters outside a forward pass."""
        self._check_open()
        for u in self.units:
            u.sched.synchronize()

    # -- telemetry ------------------------------------------------------
    def enable_tracing(self, on: bool = True) -> None:
        """Record sync spans, waits and block forwards from now on (small
        cost per bucket and per block; off by default)."""
        self._check_open()
        for u in self.units:
            u.sched.set_tracing(on)
        names = {blk.module: blk.name for u in self.units for blk in u.plan.blocks}
        self.hooks.tracer = telemetry.Tracer(self.units[0].sched, names) if on else None

    def clear_trace(self) -> None:
        for u in self.units:
            u.sched.clear_trace()

    def trace(self) -> list[telemetry.Span]:
        return telemetry.collect([u.sched for u in self.units])

    def stats(self) -> dict:
        """Total and exposed sync time, per bucket and per block (needs
        enable_tracing())."""
        return telemetry.summarize(self.trace())

    def export_chrome_trace(self, path: str) -> str:
        return str(telemetry.chrome_trace(self.trace(), path))

    def close(self) -> None:
        """Remove hooks, wait for (or abort) outstanding syncs, free buffers
        and communicators. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.hooks.remove()  # also drops the hooks' references to the schedulers
        for u in self.units:
            try:
                u.sched.host_synchronize()
            except Exception:
                u.sched.abort()
                _drain(u)
        for u in self.units:
            flat_ptrs = {f.untyped_storage().data_ptr() for f in u.flats}
            for p in (s.param for s in u.plan.params):
                if p.data.untyped_storage().data_ptr() in flat_ptrs:
                    p.data = p.data.clone()  # detach zero-copy views from the buffer
        for u in self.units:
            _release(u)
        self.units = []
        for c in self.attached_to:
            # attach() marks the model with what it returned: this ParamSync
            # or the ZeroOptimizer around it
            h = getattr(c, "_zerocomm_handle", None)
            if h is self or getattr(h, "sync", None) is self:
                setattr(c, "_zerocomm_handle", None)

    def __enter__(self) -> "ParamSync":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this zerocomm handle is closed")

    def _record_first_call(self, module: nn.Module) -> None:
        if self._launched:
            self.hooks.on_first_call = None
            return
        if module not in self._first_calls:
            self._first_calls.append(module)

    def _learn_forward_order(self) -> None:
        """Launch buckets in the order the first forward called their blocks
        (registration order where none ran), interleaving the dense and the
        expert plan by block. Rank 0's order is used by all ranks:
        collectives must be issued in the same order everywhere."""
        seen = {id(m): i for i, m in enumerate(self._first_calls)}
        keyed = []
        for ui, u in enumerate(self.units):
            big = len(seen)
            for bk in u.plan.buckets:
                pos = min((seen.get(id(u.plan.blocks[b].module), big + b) for b in bk.blocks), default=big)
                keyed.append((pos, ui, bk.index))
        sequence = [(ui, b) for _, ui, b in sorted(keyed)]
        if self.units and self.units[0].transport.world_size > 1:
            box = [sequence]
            dist.broadcast_object_list(box, group=self.units[0].group, group_src=0)
            sequence = [(int(x[0]), int(x[1])) for x in box[0]]
        self._sequence = sequence
        for ui, u in enumerate(self.units):
            u.order = [b for uj, b in sequence if uj == ui]
