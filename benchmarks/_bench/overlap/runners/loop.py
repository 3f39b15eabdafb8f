"""The timed step loop every variant shares, so that every variant's phase marks
sit in the same places: start | forward | fwd | backward (+ grad sync) | bwd |
optimizer step | end. What differs between variants is the Variant passed in.

Variants run in interleaved rounds: round 0 of every variant, then round 1 of
every variant, and so on (the ranks in lock-step). A round's first `warmup`
steps and its last step are not measured (the last one only closes the step
before it), and round 0 is warm-up as a whole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..context import Ctx, lm_loss
from ..timers import Mark, Recorder
from .variant import Variant

ALONE_WARMUP = 4  # unmeasured steps of a variant run alone (no round before it warms it up)


@dataclass(frozen=True)
class Schedule:
    """Which global steps each round runs, and which of them are measured."""

    rounds: list[range]
    measured: list[int]

    @staticmethod
    def interleaved(steps: int, round_steps: int, warmup: int) -> Schedule:
        """Rounds of `round_steps`; round 0 is warm-up."""
        rounds = [range(s, min(s + round_steps, steps)) for s in range(0, steps, round_steps)]
        measured = [s for rg in rounds[1:] for s in rg[warmup:-1]]
        return Schedule(rounds, measured)

    @staticmethod
    def single(steps: int, warmup: int) -> Schedule:
        """One round of `steps`, the first `warmup` unmeasured (a variant run alone)."""
        return Schedule([range(steps)], list(range(warmup, steps - 1)))


def run_rounds(ctx: Ctx, variants: list[Variant], sched: Schedule) -> dict[str, dict]:
    """Train every variant on ctx's batches in `sched`'s rounds; each variant's
    Recorder figures for the measured steps, its round-0 peak memory and its own
    figures (Variant.finish)."""
    recs = {v.name: Recorder(ctx.clock) for v in variants}
    memory: dict[str, dict] = {}
    first = sched.measured[0] if sched.measured else None
    for r, steps in enumerate(sched.rounds):
        for v in variants:
            dist.barrier(group=ctx.group)
            if r == 0:
                ctx.mem.reset()
            rec = recs[v.name]
            for s in steps:
                if first is not None and s == max(first - 1, 0):
                    v.start_measuring()  # in the step before the first measured one
                _one_step(ctx, v, rec, s)
            v.pause()
            if r == 0:
                memory[v.name] = ctx.mem.peak()
    out: dict[str, dict] = {}
    for v in variants:
        res = recs[v.name].finish(sched.measured)
        res["memory"] = memory[v.name]
        res.update(v.extra)
        out[v.name] = v.finish(res, sched.measured)
        v.close()
    return out


def run_alone(ctx: Ctx, v: Variant, steps: int) -> dict:
    """One variant on its own: one round of `steps`, the first ALONE_WARMUP unmeasured."""
    return run_rounds(ctx, [v], Schedule.single(steps, ALONE_WARMUP))[v.name]


def _one_step(ctx: Ctx, v: Variant, rec: Recorder, s: int) -> None:
    rec.mark("start")
    loss = lm_loss(v.module, *ctx.batch(s))
    rec.mark("fwd")
    v.backward(loss)
    rec.mark("bwd")
    v.step(s)
    rec.mark("end")
    rec.losses.append(loss.detach())


def plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def backward_then_allreduce(
    ctx: Ctx, params: list[nn.Parameter], marks: list[tuple[Mark, Mark]]
) -> Callable[[torch.Tensor], None]:
    """backward, then the hand-written grad all-reduce of (a) and (b), timed into
    marks (one per step, in step order: marks[s] is step s's; it is exposed,
    nothing overlaps it)."""

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        a = ctx.clock.mark()
        ctx.allreduce_grads(params)
        marks.append((a, ctx.clock.mark()))

    return backward
