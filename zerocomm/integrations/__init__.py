"""Integrations with training frameworks (imported on demand: each module
imports its framework). What they share needs no framework and lives here."""

from __future__ import annotations

from ..optimizer import ZeroOptimizer


def find_zero_optimizer(optimizer: object) -> ZeroOptimizer | None:
    """The ZeroOptimizer inside wrappers such as Accelerate's
    AcceleratedOptimizer (`.optimizer`) or Lightning's LightningOptimizer
    (`._optimizer`)."""
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, ZeroOptimizer):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not None else getattr(optimizer, "_optimizer", None)
    return None
