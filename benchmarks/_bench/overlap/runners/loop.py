"""The timed step loop every runner shares, so that every variant's phase marks
sit in the same places: start | forward | fwd | backward (+ grad sync) | bwd |
optimizer step | end. What differs between variants is passed in."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..context import Ctx, lm_loss
from ..timers import Mark, Recorder


def timed_steps(
    ctx: Ctx, module: nn.Module, steps: int, backward: Callable[[torch.Tensor], None], step: Callable[[int], None]
) -> Recorder:
    """Train `steps` steps on ctx's batches. backward(loss) runs the backward pass (and a
    variant's grad sync); step(s) the optimizer step of step s and zero_grad. A last
    start mark closes the last step's interval; the caller then calls finish()."""
    rec = Recorder(ctx.clock)
    for s in range(steps):
        rec.mark("start")
        loss = lm_loss(module, *ctx.batch(s))
        rec.mark("fwd")
        backward(loss)
        rec.mark("bwd")
        step(s)
        rec.mark("end")
        rec.losses.append(loss.detach())
    rec.mark("start")
    return rec


def plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def backward_then_allreduce(
    ctx: Ctx, params: list[nn.Parameter], marks: list[tuple[Mark, Mark]]
) -> Callable[[torch.Tensor], None]:
    """backward, then the hand-written grad all-reduce of (a) and (b), timed into marks
    (it is exposed: nothing overlaps it)."""

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        a = ctx.clock.mark()
        ctx.allreduce_grads(params)
        marks.append((a, ctx.clock.mark()))

    return backward
