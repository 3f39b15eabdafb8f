"""(b) Training with the seed's scheme (seed_scheme.SeedBcast)."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..context import Ctx, lm_loss, state_bytes
from ..seed_scheme import SeedBcast
from ..timers import Mark
from .loop import backward_then_allreduce, timed_steps


def run_seed_bcast(ctx: Ctx) -> dict[str, Any]:
    model = ctx.make_model()
    seed = SeedBcast(ctx, model)
    grad_marks: list[tuple[Mark, Mark]] = []

    def step(_s: int) -> None:
        seed.step()
        model.zero_grad(set_to_none=True)

    rec = timed_steps(ctx, model, ctx.args.steps, backward_then_allreduce(ctx, seed.params, grad_marks), step)
    # the forward that consumes the last step's broadcasts
    with torch.no_grad():
        lm_loss(model, *ctx.batch(ctx.args.steps))
    seed.drain()
    out = rec.finish(ctx.args.warmup)
    w, el = ctx.args.warmup, ctx.clock.elapsed
    # step i's broadcasts are waited for in forward i+1 (hooks append to the newest list)
    exposed = [sum(el(a, b) for a, b in marks) for marks in seed.wait_marks][w:]
    blocking = seed.blocking_sync_time()
    if ctx.cuda:
        total = [blocking] * len(exposed)
        total_kind = "blocking re-measurement (issue all, wait all), CUDA events"
    else:
        total = [max(d) - t0 for t0, d in zip(seed.issue, seed.done) if d][w:]
        total_kind = "first issue -> last completion (gloo future callbacks), per step"
    grad = [el(a, b) for a, b in grad_marks][w:]
    out.update(
        opt_state_bytes=state_bytes(seed.optim),
        memory=ctx.mem.peak(),
        owner_numel=seed.rank_numel,
        sync_per_step_s=total,
        sync_total_per_step_s=statistics.mean(total),
        sync_exposed_per_step_s=statistics.mean(exposed),
        exposed_per_step_s=exposed,
        sync_blocking_remeasured_s=blocking,
        sync_total_kind=total_kind,
        grad_sync_per_step_s=statistics.mean(grad),
        grad_sync_exposed_per_step_s=statistics.mean(grad),
        note="exposed = time inside Work.wait() in the block pre-hooks"
        + (" (CUDA events around the host call: the stream stall, approximately)" if ctx.cuda else ""),
    )
    seed.remove()
    return out
