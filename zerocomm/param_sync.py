"""ParamSync: after each optimizer step, deliver every rank's updated
parameters to all ranks, bucket by bucket on zerocomm's comm stream, while
the next forward pass already runs (docs/design.md, "Data flow of one step")."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from . import module_reads, telemetry
from .hooks import BlockHooks, Wait
from .plan import Plan
from .sync_unit import PlannedUnit, SyncUnit, build_unit, owned_pieces, plan_units
from .teardown import drain, register_open, release
from .transport import SimulatedTransport, open_transport

__all__ = ["ParamSync", "PlannedUnit", "SyncUnit", "owned_pieces", "plan_units"]


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


@dataclass
class Launch:
    """The launch in progress (see `ParamSync.launching`)."""

    sync: "ParamSync"
    moved: list[str]  # parameters rebound since the last step, put back
    enqueued: list[Wait] = field(default_factory=list)

    def __call__(self, buckets: list[tuple[int, int]]) -> None:
        """Enqueue the sync of these (unit, bucket)s now."""
        for ui, b in buckets:
            u = self.sync.units[ui]
            pid = u.buckets[b].param_id
            u.sched.launch([pid])
            self.enqueued.append((u.sched, pid))


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
        self._sequence: list[tuple[int, int]] = []  # (unit, bucket) launch order, from the first launch
        for name, grp, plan, layout in units:  # planned once, by attach (see plan_units)
            t = open_transport(grp, device, transport, timeout_s, high_priority, layout.replicate_group)
            assert t.world_size == plan.world_size, (name, t.world_size, plan.world_size)
            self.units.append(build_unit(name, plan, t, device, layout))
        waits: dict[nn.Module, list[Wait]] = {}
        for u in self.units:
            for blk, buckets in zip(u.plan.blocks, u.plan.block_buckets):
                waits.setdefault(blk.module, []).extend((u.sched, u.buckets[b].param_id) for b in buckets)
        roots: dict[nn.Module, set[Wait]] = {}
        for chunk in chunks:
            inside = {id(m) for m in chunk.modules()}
            roots[chunk] = {w for m, ws in waits.items() if id(m) in inside for w in ws}
        self._slots = _slots(chunks, self.units)
        self.hooks = BlockHooks(waits, roots, on_first_call=self._record_first_call)
        self.hooks.install()
        # reads of the parameters outside a forward wait for the sync ([Note: reads after step])
        self.reads = module_reads.build(chunks, self.units, self.hooks, device)
        register_open(self)

    # -- public API -----------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The dense (non-expert) plan; `plans` has all of them."""
        return self.units[0].plan

    @property
    def plans(self) -> dict[str, Plan]:
        return {u.name: u.plan for u in self.units}

    @property
    def sequence(self) -> list[tuple[int, int]]:
        """(unit, bucket) in launch order, the same on every rank; learnt from
        the first forward at the first launch (empty before it)."""
        return list(self._sequence)

    def launch(self) -> None:
        """Enqueue the sync of every bucket, in forward order, after the work
        the compute stream has queued so far (the optimizer step)."""
        with self.launching() as launch:
            launch(self._sequence)

    @contextlib.contextmanager
    def launching(self) -> Iterator["Launch"]:
        """One step's launch, in parts: on entry the parameter bindings are
        checked (`Launch.moved`: the names put back) and the launch order
        is learnt; `launch(buckets)` enqueues those (unit, bucket) syncs
        now; on exit the forward hooks wait for everything enqueued. The
        sharded optimizer steps its shard in groups inside, enqueuing each
        group's syncs as soon as it is stepped ([Note: pipelined step])."""
        self._check_open()
        moved = self.rebind_moved_params()
        if not self._launched:
            self._learn_forward_order()
            self._launched = True
        launch = Launch(self, moved)
        try:
            yield launch
        finally:
            if launch.enqueued:
                self.hooks.arm(launch.enqueued)
                self.reads.launched(launch.enqueued)

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
        self.reads.settled()

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

    def traffic(self) -> dict[str, dict[str, int]]:
        """Bytes this rank handed to each of zerocomm's collectives since
        attach, per tier: {"shard": {"all_gather": n, ...}, "replica":
        {"all_reduce": n}} (hierarchical ZeRO: only gradient shards cross
        replicas). Always counted; no tracing needed."""
        self._check_open()
        return telemetry.traffic([u.sched for u in self.units])

    def close(self) -> None:
        """Remove hooks, wait for (or abort) outstanding syncs, free buffers
        and communicators. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.reads.remove()  # waits for nothing: the model's own classes and dicts again
        self.hooks.remove()  # also drops the hooks' references to the schedulers
        for u in self.units:
            try:
                u.sched.host_synchronize()
            except Exception:
                u.sched.abort()
                drain(u)
        for u in self.units:
            flat_ptrs = {f.untyped_storage().data_ptr() for f in u.flats}
            for p in (s.param for s in u.plan.params):
                if p.data.untyped_storage().data_ptr() in flat_ptrs:
                    p.data = p.data.clone()  # the parameters leave the buffers, which are freed
        for u in self.units:
            release(u)
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
        first = self.units[0] if self.units else None
        if first is not None and first.transport.world_size * first.transport.replica_size > 1:
            # over every rank of the layout: the replicas launch in one order too
            box = [sequence]
            dist.broadcast_object_list(box, group=first.data_parallel_group, group_src=0)
            sequence = [(int(x[0]), int(x[1])) for x in box[0]]
        self._sequence = sequence
        for ui, u in enumerate(self.units):
            u.order = [b for uj, b in sequence if uj == ui]
