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
from .plan import Bucket, Plan, build_plan
from .transport import SimulatedTransport, Transport

ALL_GATHER = _C.ALL_GATHER  # a param bucket's root: in-place all-gather instead of a broadcast


class PlannedUnit(NamedTuple):
    """A plan and the group it syncs over, before any transport exists."""

    name: str  # "dense" or "expert"
    group: dist.ProcessGroup
    plan: Plan


def plan_units(
    chunks: list[nn.Module],
    *,
    mode: str,
    group: dist.ProcessGroup,
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
    Collective-free, so attach fingerprints them before any collective."""
    specs = [("dense", group, None if expert_filter is None else (lambda n, p: not expert_filter(n, p)))]
    if expert_filter is not None:
        specs.append(("expert", expert_group if expert_group is not None else group, expert_filter))
    out = []
    for name, grp, pfilter in specs:
        world = 1 if isinstance(transport, SimulatedTransport) else dist.get_world_size(grp)
        plan = build_plan(
            chunks,
            mode=mode,
            world_size=world,
            partition=partition,
            bucket_mb=bucket_mb,
            align_bytes=align_bytes,
            blocks=blocks,
            param_filter=pfilter,
        )
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


class _Scheduler(_C.SyncScheduler):
    """The native scheduler, also holding a view of every buffer registered
    with it (param flats, grad flats and shards: all the communicator hands
    to gloo), so `teardown.release` can order the teardown safely."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.buffers: list[torch.Tensor] = []

    def add_param_bucket(self, flat: torch.Tensor, *args: Any) -> int:
        self.buffers.append(flat.view(-1))
        return super().add_param_bucket(flat, *args)

    def add_grad_bucket(self, flat: torch.Tensor, shard: torch.Tensor, *args: Any) -> int:
        self.buffers += [flat.view(-1), shard.view(-1)]
        return super().add_grad_bucket(flat, shard, *args)
