"""A sync unit: one plan (dense or expert) with its transport, its native
scheduler and its persistent flat buffers, built once at attach."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ._ext import _C
from .blocks import BlocksArg
from .layout import DPLayout, flat_layout
from .plan import Bucket, Plan, plan_model
from .transport import SimulatedTransport, Transport

Collective = _C.Collective


class PlannedUnit(NamedTuple):
    """A plan and the layout it syncs over, before any transport exists."""

    name: str  # "dense" or "expert"
    group: dist.ProcessGroup  # the shard group (layout.shard_group)
    plan: Plan
    layout: DPLayout


def plan_units(
    chunks: list[nn.Module],
    *,
    mode: str,
    layout: DPLayout,
    expert_group: dist.ProcessGroup | None,
    expert_filter: Callable[[str, nn.Parameter], bool] | None,
    transport: str | SimulatedTransport,
    partition: str,
    bucket_mb: float,
    align_bytes: int,
    blocks: BlocksArg,
) -> list[PlannedUnit]:
    """The plans of one attach, built once: the dense plan, and the expert
    plan (its own group) when `expert_filter` picks expert parameters.
    Each plan is over its layout's shard group. The expert plan shards flat
    over `expert_group` (no replica stage); without one it shares the dense
    layout ([Note: hierarchical layout]). Collective-free, so attach
    fingerprints them before any collective."""
    specs = [("dense", layout, None if expert_filter is None else (lambda n, p: not expert_filter(n, p)))]
    if expert_filter is not None:
        specs.append(("expert", flat_layout(expert_group) if expert_group is not None else layout, expert_filter))
    out = []
    for name, lay, pfilter in specs:
        world = 1 if isinstance(transport, SimulatedTransport) else lay.shard_size
        plan = plan_model(  # attach checked the options
            chunks,
            mode=mode,
            world_size=world,
            partition=partition,
            bucket_mb=bucket_mb,
            align_bytes=align_bytes,
            blocks=blocks,
            param_filter=pfilter,
        )
        out.append(PlannedUnit(name, lay.shard_group, plan, lay))
    return out


def alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over the same memory as `t` with a version counter of its
    own ([Note: gradient views]): what zerocomm's own collectives write
    through, so their writes never look like a user's in-place edit."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )


@dataclass(eq=False)
class BucketRecord:
    """One bucket of one unit, and everything zerocomm holds for it
    ([Note: one bucket record]): the parameter flat (the parameters are
    views of it), the scheduler id of its sync and, once a sharded
    optimizer is built, its gradient buffers, master and scheduler id.
    As in Megatron's param_and_grad_buffer, the buffers are the single
    source of truth: parameters, gradients and the local optimizer's
    tensors are views of them."""

    spec: Bucket  # the plan's layout: params, offsets, owner, shard size
    label: str
    param_flat: torch.Tensor
    param_id: int  # scheduler id of the parameter sync
    lo: int = 0  # first element of this rank's shard (allgather), else 0
    # -- gradient side (filled by the sharded optimizer's mode) --
    grad_flat: torch.Tensor | None = None  # the bucket's gradients; p.grad are views of it
    grad_views: list[torch.Tensor | None] = field(default_factory=list)  # per param of the bucket
    grad_shard: torch.Tensor | None = None  # the reduced gradient this rank keeps
    grad_id: int = -1  # scheduler id of the gradient reduction
    master: torch.Tensor | None = None  # allgather: this rank's master slice
    master_grad: torch.Tensor | None = None  # persistent master_dtype copy of the reduced gradient
    locals: list[Any] = field(default_factory=list)  # the optimizer's LocalParams of this bucket

    @property
    def index(self) -> int:
        return self.spec.index


@dataclass
class SyncUnit:
    """One plan (dense or expert) with its own transport, scheduler and
    bucket records."""

    name: str
    plan: Plan
    transport: Transport
    sched: "_C.SyncScheduler"
    buckets: list[BucketRecord]
    group: dist.ProcessGroup | None = None  # the group it shards and syncs over (layout.shard_group)
    layout: DPLayout | None = None  # where the unit's shards live and which ranks replicate them
    order: list[int] = field(default_factory=list)  # bucket launch order
    # per plan param: its view of the flat buffer; a parameter rebound
    # elsewhere is put back on it
    bound: list[torch.Tensor] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def data_parallel_group(self) -> dist.ProcessGroup | None:
        """Every rank of the unit's layout: the shard group and its replicas
        (what gradients are averaged over)."""
        return self.layout.group if self.layout is not None else self.group

    @property
    def flats(self) -> list[torch.Tensor]:
        """The parameter flat of every bucket, in bucket order."""
        return [r.param_flat for r in self.buckets]

    def shard_range(self, b: Bucket) -> tuple[int, int]:
        """[start, end) of this rank's slice of an allgather bucket."""
        return b.shard_range(self.rank)


def owned_pieces(b: Bucket, plan: Plan, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(param index, start inside the param, start inside the flat buffer) of
    every piece of a parameter that falls into [lo, hi) of bucket `b`
    (kept for custom loops; `plan.pieces` also gives each piece's length)."""
    return [(pc.param, pc.start, pc.at) for pc in plan.pieces(b, lo, hi)]


def build_unit(name: str, plan: Plan, transport: Transport, device: torch.device, layout: DPLayout) -> SyncUnit:
    """Allocates each bucket's flat buffer, makes the parameters views of it
    (the sync writes them in place: no copy in or out) and registers the
    bucket's sync with the scheduler."""
    sched = _C.SyncScheduler(transport.stream, transport.comm, int(transport.timeout_s * 1000), transport.replica)
    rank, records = transport.rank, []
    for b in plan.buckets:
        flat = torch.zeros(b.padded_numel, dtype=b.dtype, device=device)
        for i, off in zip(b.params, b.offsets):
            p = plan.params[i].param
            view = flat.narrow(0, off, p.numel())
            view.copy_(p.detach().view(-1))
            p.data = view.view(p.shape)  # the old storage is freed here, bucket by bucket
        # broadcast from the owner, or (no owner: every rank holds a slice) all-gather
        op, root = (Collective.BROADCAST, b.owner) if b.owner is not None else (Collective.ALL_GATHER, -1)
        label = f"{name}:{b.index}[{plan.blocks[b.blocks[0]].name}" + (
            f"..{plan.blocks[b.blocks[-1]].name}]" if len(b.blocks) > 1 else "]"
        )
        pid = sched.add_param_bucket(alias(flat), root, label, op)
        lo = b.shard_range(rank)[0] if b.owner is None else 0
        records.append(BucketRecord(b, label, flat, pid, lo))
    bound = [s.param.detach() for s in plan.params]
    return SyncUnit(
        name,
        plan,
        transport,
        sched,
        records,
        group=layout.shard_group,
        layout=layout,
        order=list(range(len(plan.buckets))),
        bound=bound,
    )
