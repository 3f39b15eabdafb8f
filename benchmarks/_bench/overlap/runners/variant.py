"""What the step loop needs from one variant: the module its forward runs, how
it runs backward and the optimizer step, and what it does between rounds.

The variants are timed in interleaved rounds (every variant runs a few steps,
then the next one; see loop.run_rounds), so a machine whose speed drifts during
the run slows every variant alike instead of whichever happened to run then."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


def _nothing() -> None:
    return None


def _same(out: dict[str, Any], measured: list[int]) -> dict[str, Any]:
    return out


@dataclass
class Variant:
    """One training setup under test."""

    name: str
    module: nn.Module  # what the forward runs (a DDP wrapper, a DeepSpeed engine, the model)
    backward: Callable[[torch.Tensor], None]  # loss -> gradients (and the variant's grad sync)
    step: Callable[[int], None]  # optimizer step of step s, then zero_grad
    # End of a round, untimed: let work still in flight land (zerocomm's sync of
    # the round's last step), so that it never runs inside another variant's steps.
    pause: Callable[[], None] = _nothing
    # Once, at the start of the step before the first measured one (zerocomm
    # turns its tracing on at that step's launch, so the measured forwards are traced).
    start_measuring: Callable[[], None] = _nothing
    # After the last round: the timing summary (timers.Recorder.finish) and the
    # global indices of the measured steps -> the summary plus this variant's figures.
    finish: Callable[[dict[str, Any], list[int]], dict[str, Any]] = _same
    close: Callable[[], None] = _nothing
    extra: dict[str, Any] = field(default_factory=dict)  # set by the maker, merged into the result
