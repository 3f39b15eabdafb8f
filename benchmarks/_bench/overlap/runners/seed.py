"""(b) Training with the seed's scheme (seed_scheme.SeedBcast)."""

from __future__ import annotations

import statistics
from typing import Any

from ..context import Ctx, state_bytes
from ..seed_scheme import SeedBcast
from ..timers import Mark
from .loop import backward_then_allreduce
from .variant import Variant


def make_seed_bcast(ctx: Ctx) -> Variant:
    model = ctx.make_model()
    seed = SeedBcast(ctx, model)
    grad_marks: list[tuple[Mark, Mark]] = []

    def step(_s: int) -> None:
        seed.step()
        model.zero_grad(set_to_none=True)

    def finish(out: dict[str, Any], measured: list[int]) -> dict[str, Any]:
        el = ctx.clock.elapsed
        # step s's interval holds forward s, which waits for step s-1's broadcasts
        # (the hooks append to the newest list: wait_marks[s - 1])
        exposed = [sum(el(a, b) for a, b in seed.wait_marks[s - 1]) for s in measured]
        blocking = seed.blocking_sync_time()
        if ctx.cuda:
            total = [blocking] * len(exposed)
            total_kind = "blocking re-measurement (issue all, wait all), CUDA events"
        else:
            total = [max(seed.done[s - 1]) - seed.issue[s - 1] for s in measured if seed.done[s - 1]]
            total_kind = "first issue -> last completion (gloo future callbacks), per step"
        grad = [el(*grad_marks[s]) for s in measured]
        out.update(
            opt_state_bytes=state_bytes(seed.optim),
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
        return out

    return Variant(
        "seed_bcast",
        model,
        backward_then_allreduce(ctx, seed.params, grad_marks),
        step,
        pause=seed.drain,  # the round's last broadcasts land before the next variant runs
        finish=finish,
        close=seed.remove,
    )
