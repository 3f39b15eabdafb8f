"""(b) The seed's scheme (InternEvo ParamAsyncBcastHandler), re-implemented here
only, reduced to what the benchmark needs: owners by an optimal contiguous partition
over the params in forward order, a local AdamW per rank over its own params, one
async dist.broadcast per param after the step, and a forward pre-hook per block
that waits for every pending broadcast of the ranks the block spans."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from .context import Ctx
from .timers import Mark


def _broadcast_async(p: nn.Parameter, src: int) -> dist.Work:
    work = dist.broadcast(p.data, src=src, async_op=True)
    assert work is not None  # None only for ranks outside the group; the seed uses the world
    return work


class SeedBcast:
    """The seed's ParamAsyncBcastHandler scheme on `model`: step() broadcasts, the
    block pre-hooks wait; wait_marks / issue / done are what the runner times."""

    def __init__(self, ctx: Ctx, model: nn.Module) -> None:
        from zerocomm.partition import balanced_partition

        self.ctx, self.clock = ctx, ctx.clock
        blocks: list[tuple[str, nn.Module]] = []
        for name, child in model.named_children():  # the seed's block rule
            if isinstance(child, nn.ModuleList):
                blocks += [(f"{name}.{i}", b) for i, b in enumerate(child)]
            else:
                blocks.append((name, child))
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        block_params: list[tuple[nn.Module, list[nn.Parameter]]] = []
        for _name, blk in blocks:
            ps = [p for p in blk.parameters() if p.requires_grad]
            block_params.append((blk, ps))
            for p in ps:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        owners = balanced_partition([p.numel() for p in self.params], ctx.world)
        self.owner = {id(p): r for p, r in zip(self.params, owners)}
        self.block_ranks = {blk: sorted({self.owner[id(p)] for p in ps}) for blk, ps in block_params if ps}
        mine = [p for p in self.params if self.owner[id(p)] == ctx.rank]
        self.rank_numel = [sum(p.numel() for p in self.params if self.owner[id(p)] == r) for r in range(ctx.world)]
        self.optim = ctx.adamw(mine if mine else [nn.Parameter(torch.zeros(0, device=ctx.device))])
        self.handles: dict[int, list[dist.Work]] = {r: [] for r in range(ctx.world)}
        self.wait_marks: list[list[tuple[Mark, Mark]]] = []  # per step: (before, after) around Work.wait()
        self.issue: list[float] = []  # per step: host time of the first issue
        self.done: list[list[float]] = []  # per step: completion times (future callbacks)
        self.hooks = [blk.register_forward_pre_hook(self._pre_hook) for blk in self.block_ranks]

    def step(self) -> None:
        self.optim.step()
        self.wait_marks.append([])
        done: list[float] = []
        self.done.append(done)
        self.issue.append(time.perf_counter())
        for p in self.params:
            owner = self.owner[id(p)]
            work = _broadcast_async(p, owner)
            if not self.ctx.cuda:
                work.get_future().then(lambda _f: done.append(time.perf_counter()))
            self.handles[owner].append(work)

    def _pre_hook(self, module: nn.Module, args: object) -> None:
        pending: list[dist.Work] = []
        for r in self.block_ranks[module]:
            pending.extend(self.handles[r])
            self.handles[r] = []
        if not pending:
            return
        a = self.clock.mark()
        for w in pending:
            w.wait()
        if self.wait_marks:
            self.wait_marks[-1].append((a, self.clock.mark()))

    def drain(self) -> None:
        for r in self.handles:
            for w in self.handles[r]:
                w.wait()
            self.handles[r] = []

    def blocking_sync_time(self, reps: int = 5) -> float:
        """Issue all broadcasts and wait for all of them: the sync's own duration."""
        ts: list[float] = []
        for _ in range(reps):
            dist.barrier()
            a = self.clock.mark()
            works = [_broadcast_async(p, self.owner[id(p)]) for p in self.params]
            for w in works:
                w.wait()
            b = self.clock.mark()
            self.clock.resolve()
            ts.append(self.clock.elapsed(a, b))
        return statistics.median(ts)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
