"""What `p.grad` is once ZeRO-2 has handed a gradient to the reduce-scatter.

With `shard_grads=True` only this rank's reduced slice of a bucket is kept:
the full gradient exists nowhere after hand-over. Leaving `p.grad` None
would make code written for torch quietly wrong -- `torch.nn.utils.
clip_grad_norm_(model.parameters())` finds no gradient and clips nothing, a
backward after a step without `zero_grad()` starts from zero instead of
adding. So `p.grad` becomes a `HandedOver` marker instead ([Note: handed-over
gradients] in docs/design.md): a tensor of the parameter's shape, dtype and
device without storage, whose every use raises an error saying what to do.
`zero_()` (zero_grad(set_to_none=False)) and the flag changes zero_grad
makes are the exceptions; the gradient hooks (grad_path) drop the marker
before backward accumulates into the parameter again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .guards import CLIP_HINT

_ALLOWED = {torch.ops.aten.zero_.default, torch.ops.aten.detach_.default}


class HandedOver(torch.Tensor):
    """`p.grad` of a parameter whose gradient ZeRO-2 reduced away."""

    param_name: str
    stale: bool  # a step has used it: the next backward must not start from zero
    zeroed: bool  # zero_()'d by the user: as good as None

    @staticmethod
    def __new__(cls, like: torch.Tensor, name: str) -> "HandedOver":
        return torch.Tensor._make_wrapper_subclass(
            cls, like.shape, dtype=like.dtype, device=like.device, requires_grad=False
        )

    def __init__(self, like: torch.Tensor, name: str) -> None:
        self.param_name = name
        self.stale = False
        self.zeroed = False

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]  # printing reads values
        return f"HandedOver({self.param_name!r}: reduced by zerocomm, shard_grads=True)"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        if func in _ALLOWED:
            marker = args[0]
            if func is torch.ops.aten.zero_.default:
                marker.zeroed = True
            return marker
        flat, _ = tree_flatten((args, kwargs or {}))
        names = [a.param_name for a in flat if isinstance(a, HandedOver)] or ["a parameter"]
        raise RuntimeError(
            f"zerocomm: the gradient of {names[0]!r} was handed to the reduce-scatter "
            "(attach(..., shard_grads=True) keeps only this rank's reduced slice of it), so p.grad "
            f"cannot be read or changed between backward and step ({func}); {CLIP_HINT}; for the "
            "global gradient norm use zopt.grad_norm(), to clamp values zopt.clip_grad_value_()"
        )
