"""Fused flatten / unflatten of many tensors into one flat buffer."""

from __future__ import annotations

from typing import Sequence

import torch

from ._ext import _C

FlatLayout = _C.FlatLayout
FlatLayout.__doc__ = (
    "Where each tensor lives in a flat buffer: offsets aligned to align_bytes, "
    "total_numel with padding. Build once per tensor list and reuse in hot loops."
)


def _as_sequence(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    # Lists and tuples go to the native call as they are: it converts and
    # type-checks every element anyway (one pass, no Python loop per tensor).
    if isinstance(tensors, torch.Tensor):
        raise TypeError("expected a sequence of tensors, got a single tensor")
    return tensors if isinstance(tensors, (list, tuple)) else list(tensors)


def _name_bad_element(tensors: Sequence[torch.Tensor]) -> None:
    """After the native call refused its arguments: say which element is wrong.

    Only on the error path, so the hot call pays nothing for the message."""
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor") from None


def flatten(
    tensors: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    align_bytes: int = 16,
    layout: FlatLayout | None = None,
) -> torch.Tensor:
    """Copy `tensors` into one flat 1-D buffer (one kernel launch on CUDA).

    Each tensor starts at an offset aligned to `align_bytes`; padding is zero
    when the buffer is allocated here. Pass `layout` to skip recomputing it.
    """
    tensors = _as_sequence(tensors)
    try:
        if layout is None:
            layout = FlatLayout(tensors, align_bytes)
        return _C.flatten(tensors, layout, out)
    except TypeError:
        _name_bad_element(tensors)
        raise


def unflatten(
    flat: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    layout: FlatLayout | None = None,
    align_bytes: int = 16,
) -> None:
    """Copy slices of `flat` back into `tensors` (in place, one launch on CUDA)."""
    tensors = _as_sequence(tensors)
    try:
        if layout is None:
            layout = FlatLayout(tensors, align_bytes)
        _C.unflatten(flat, tensors, layout)
    except TypeError:
        _name_bad_element(tensors)
        raise
