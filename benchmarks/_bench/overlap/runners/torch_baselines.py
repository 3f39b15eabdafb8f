"""(e) DDP and (a) torch's ZeroRedundancyOptimizer: the two torch baselines."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..context import Ctx, state_bytes, unique_params
from ..timers import Mark
from .loop import backward_then_allreduce, plain_backward
from .variant import Variant


def make_ddp(ctx: Ctx) -> Variant:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = ctx.make_model()
    ddp = DDP(model, device_ids=[ctx.device.index] if ctx.cuda else None)
    opt = ctx.adamw(ddp.parameters())

    def step(_s: int) -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def finish(out: dict[str, Any], _measured: list[int]) -> dict[str, Any]:
        out.update(
            opt_state_bytes=state_bytes(opt),
            sync_total_per_step_s=0.0,
            sync_exposed_per_step_s=0.0,
            note="no parameter sync: every rank steps the full model; grads all-reduced in "
            "DDP buckets overlapped with backward",
        )
        return out

    return Variant("ddp", ddp, plain_backward, step, finish=finish)


def make_zero_torch(ctx: Ctx) -> Variant:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = ctx.make_model()
    params = unique_params(model)
    zro = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=ctx.args.lr, weight_decay=0.1)
    clock = ctx.clock
    sync_marks: list[tuple[Mark, Mark]] = []  # one per step, in step order
    grad_marks: list[tuple[Mark, Mark]] = []
    # step() = local step + _sync_params(), the blocking broadcast of every shard; torch
    # has no public hook there, so the benchmark wraps that private method to time it
    orig_sync = zro._sync_params  # type: ignore[attr-defined]

    def timed_sync() -> None:
        a = clock.mark()
        orig_sync()
        sync_marks.append((a, clock.mark()))

    zro._sync_params = timed_sync  # type: ignore[attr-defined]

    def step(_s: int) -> None:
        zro.step()
        zro.zero_grad(set_to_none=True)

    def finish(out: dict[str, Any], measured: list[int]) -> dict[str, Any]:
        sync = [clock.elapsed(*sync_marks[s]) for s in measured]
        grad = [clock.elapsed(*grad_marks[s]) for s in measured]
        out.update(
            opt_state_bytes=state_bytes(zro.optim),
            sync_per_step_s=sync,
            sync_total_per_step_s=statistics.mean(sync),
            sync_exposed_per_step_s=statistics.mean(sync),
            grad_sync_per_step_s=statistics.mean(grad),
            grad_sync_exposed_per_step_s=statistics.mean(grad),
            note="param sync = ZeroRedundancyOptimizer._sync_params() inside step(), blocking: "
            "exposed == total; grads: one flat all_reduce after backward (exposed)",
        )
        return out

    return Variant("zero_torch", model, backward_then_allreduce(ctx, params, grad_marks), step, finish=finish)
