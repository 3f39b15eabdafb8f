"""The sharded optimizer's buffers, with one owner: per unit and bucket, the
gradient bucket registered with the unit's scheduler, this rank's reduced
gradient, its master shard, and the tensors the local optimizer steps (views
of the master where one exists). As in Megatron's param_and_grad_buffer, the
buffer is the single source of truth and the optimizer's tensors are views,
so no code walks parallel lists with a position counter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._ext import _C
from .param_sync import SyncUnit

REDUCE_SCATTER = _C.REDUCE_SCATTER  # a grad bucket's root: reduce-scatter instead of reduce-to-owner


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
class BucketBuffers:
    """One gradient bucket of one unit, and what this rank steps of it."""

    grad_flat: torch.Tensor  # the bucket's gradients, reduced in place (broadcast mode: on the owner)
    grad_shard: torch.Tensor | None  # allgather: this rank's reduce-scatter output
    master: torch.Tensor | None  # allgather: this rank's master slice (the flat shard itself, or a copy)
    master_lo: int = 0  # where the master's slice starts in the flat buffer
    locals: list[LocalParam] = field(default_factory=list)


class ShardBuffers:
    """Builds, registers and owns every unit's `BucketBuffers`."""

    def __init__(
        self,
        units: list[SyncUnit],
        index_of: dict[int, int],
        group_of: dict[int, int],
        master_dtype: torch.dtype | None,
        device: torch.device,
    ) -> None:
        self.units = units
        self.buckets: list[list[BucketBuffers]] = [
            [self._build(u, b.index, index_of, group_of, master_dtype, device) for b in u.plan.buckets] for u in units
        ]

    @staticmethod
    def _build(
        u: SyncUnit,
        bi: int,
        index_of: dict[int, int],
        group_of: dict[int, int],
        master_dtype: torch.dtype | None,
        device: torch.device,
    ) -> BucketBuffers:
        plan, b = u.plan, u.plan.buckets[bi]
        flat = torch.zeros(b.padded_numel, dtype=b.dtype, device=device)
        numels = [plan.params[i].numel for i in b.params]
        if plan.mode == "broadcast":
            assert b.owner is not None  # every broadcast bucket has one
            u.sched.add_grad_bucket(
                flat,
                torch.empty(0, dtype=b.dtype, device=device),
                list(b.offsets),
                numels,
                b.owner,
                f"grad:{u.name}:{b.index}",
            )
            bb = BucketBuffers(flat, None, None)
            if b.owner == u.rank:
                for i, off in zip(b.params, b.offsets):
                    p = plan.params[i].param
                    t = p
                    if master_dtype is not None and p.dtype != master_dtype:
                        t = nn.Parameter(p.detach().to(master_dtype).clone())
                    bb.locals.append(LocalParam(t, index_of[id(p)], 0, p.numel(), group_of[id(p)], i, off))
            return bb
        shard = torch.zeros(b.shard_numel, dtype=b.dtype, device=device)
        u.sched.add_grad_bucket(flat, shard, list(b.offsets), numels, REDUCE_SCATTER, f"grad:{u.name}:{b.index}")
        lo, hi = u.shard_range(b)
        flat_shard = u.flats[b.index].narrow(0, lo, b.shard_numel)
        want = master_dtype or b.dtype
        # Same dtype: the sync buffer's own slice IS the master (the
        # all-gather leaves it in place); otherwise a master_dtype copy.
        master = flat_shard if want == b.dtype else flat_shard.detach().to(want).clone()
        bb = BucketBuffers(flat, shard, master, lo)
        for pc in plan.pieces(b, lo, hi):
            p = plan.params[pc.param].param
            piece = nn.Parameter(master.narrow(0, pc.at - lo, pc.numel))  # shares storage
            bb.locals.append(LocalParam(piece, index_of[id(p)], pc.start, pc.numel, group_of[id(p)], pc.param, pc.at))
        return bb

    # -- views --------------------------------------------------------------
    def locals(self, ui: int | None = None) -> list[LocalParam]:
        """Every local tensor (of one unit), in unit and bucket order."""
        units = range(len(self.units)) if ui is None else [ui]
        return [lp for u in units for bb in self.buckets[u] for lp in bb.locals]

    def nbytes(self) -> int:
        """Gradient flats and shards on this rank."""
        n = 0
        for bbs in self.buckets:
            for bb in bbs:
                n += bb.grad_flat.numel() * bb.grad_flat.element_size()
                if bb.grad_shard is not None:
                    n += bb.grad_shard.numel() * bb.grad_shard.element_size()
        return n

    # -- per step -----------------------------------------------------------
    def take_local_grads(self, ui: int) -> None:
        """[Note: DDP-wrapped models] p.grad is already averaged over the
        ranks: copy this rank's part into the reduced-gradient buffers."""
        u = self.units[ui]
        for b, bb in zip(u.plan.buckets, self.buckets[ui]):
            if u.plan.mode == "broadcast" and b.owner != u.rank:
                continue
            for i, off in zip(b.params, b.offsets):
                p = u.plan.params[i].param
                dst = bb.grad_flat.narrow(0, off, p.numel())
                dst.copy_(p.grad.detach().view(-1)) if p.grad is not None else dst.zero_()
            if bb.grad_shard is not None:
                bb.grad_shard.copy_(bb.grad_flat.narrow(0, bb.master_lo, b.shard_numel))

    def bind_grads(self, has_grad: list[list[bool]]) -> None:
        """Point each local tensor's .grad at its reduced gradient; None where
        no rank had a gradient (torch's optimizers skip those)."""
        for ui, u in enumerate(self.units):
            for b, bb in zip(u.plan.buckets, self.buckets[ui]):
                if bb.grad_shard is None:  # broadcast: the reduced bucket, on its owner
                    for lp in bb.locals:
                        spec = u.plan.params[lp.param]
                        g = bb.grad_flat.narrow(0, lp.at, lp.numel).view(spec.shape)
                        if lp.tensor is spec.param and lp.user_grad is None:
                            lp.user_grad = lp.tensor.grad  # handed back after the step
                        if not has_grad[ui][lp.param]:
                            lp.tensor.grad = None
                        else:
                            lp.tensor.grad = g if g.dtype == lp.tensor.dtype else g.to(lp.tensor.dtype)
                    continue
                assert bb.master is not None
                shard = bb.grad_shard if bb.grad_shard.dtype == bb.master.dtype else bb.grad_shard.to(bb.master.dtype)
                for lp in bb.locals:
                    ok = has_grad[ui][lp.param]
                    lp.tensor.grad = shard.narrow(0, lp.at - bb.master_lo, lp.numel) if ok else None

    def unbind_grads(self) -> None:
        """A model parameter stepped in place gets its own grad back."""
        for lp in self.locals():
            lp.tensor.grad, lp.user_grad = lp.user_grad, None

    def write_back(self, ui: int, b: int) -> None:
        """This rank's stepped masters of bucket b -> what the sync moves
        (working parameters, or the flat buffer's shard)."""
        u, bb = self.units[ui], self.buckets[ui][b]
        if bb.master is None:  # broadcast
            for lp in bb.locals:
                p = u.plan.params[lp.param].param
                if lp.tensor is not p:
                    p.detach().copy_(lp.tensor)
            return
        flat_shard = u.flats[b].narrow(0, bb.master_lo, bb.master.numel())
        if bb.master.data_ptr() != flat_shard.data_ptr():
            flat_shard.copy_(bb.master)
