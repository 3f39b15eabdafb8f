"""What `p.grad` is once zerocomm has handed a gradient to its reduction.

ZeRO-1 reduces each bucket in place on the comm worker while backward and
the step go on: from hand-over until the step has waited for it, the
bucket holds the local, a partly reduced or the reduced gradient depending
on timing, and afterwards only this rank's own part is the average (the
rest is whatever the collective left there). ZeRO-2 (`shard_grads=True`)
keeps only this rank's reduced slice: the full gradient exists nowhere.
Either way a read of `p.grad` would be silently wrong -- a logged norm
that differs run to run and from rank to rank, `torch.nn.utils.
clip_grad_norm_(model.parameters())` clipping a shard or nothing -- so
`p.grad` becomes a `HandedOver` marker instead ([Note: handed-over
gradients] in docs/design.md): a tensor of the parameter's shape, dtype and
device without storage, whose every use raises an error saying what to do.
`zero_()` and `_foreach_zero_` (zero_grad(set_to_none=False)) and the
flag changes zero_grad makes are the exceptions; the gradient hooks
(grad_path) drop the marker before backward accumulates into the parameter
again, and a deep copy of the model gets None (the gradient it stands for
is not this rank's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .guards import CLIP_HINT, grad_scaler_unsupported

_ALLOWED = {torch.ops.aten.zero_.default, torch.ops.aten.detach_.default}
_FOREACH_ZERO = torch.ops.aten._foreach_zero_.default  # Optimizer.zero_grad(set_to_none=False), foreach
_UNSCALE = torch.ops.aten._amp_foreach_non_finite_check_and_unscale_.default  # GradScaler.unscale_


# Why the gradient cannot be read, per mode (the marker's `why`).
IN_PLACE = "zerocomm reduces it in place, and this rank keeps only the part it steps"
SHARDED = "attach(..., shard_grads=True) keeps only this rank's reduced slice of it"


class HandedOver(torch.Tensor):
    """`p.grad` of a parameter whose gradient zerocomm's reduction took."""

    param_name: str
    why: str  # IN_PLACE or SHARDED
    stale: bool  # a step has used it: the next backward must not start from zero
    zeroed: bool  # zero_()'d by the user: as good as None

    @staticmethod
    def __new__(cls, like: torch.Tensor, name: str, why: str) -> "HandedOver":
        return torch.Tensor._make_wrapper_subclass(
            cls, like.shape, dtype=like.dtype, device=like.device, requires_grad=False
        )

    def __init__(self, like: torch.Tensor, name: str, why: str) -> None:
        self.param_name = name
        self.why = why
        self.renew()

    def renew(self) -> None:
        """Handed over (again) in this step: neither stale nor zeroed."""
        self.stale = False
        self.zeroed = False

    def __deepcopy__(self, memo: Any) -> None:  # the copy's p.grad
        return None

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]  # printing reads values
        return f"HandedOver({self.param_name!r}: handed to zerocomm's gradient reduction)"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        if func in _ALLOWED:
            marker = args[0]
            if func is torch.ops.aten.zero_.default:
                marker.zeroed = True
            return marker
        if func is _FOREACH_ZERO:
            for t in args[0]:
                if isinstance(t, HandedOver):
                    t.zeroed = True
                else:
                    t.zero_()
            return None
        if func is _UNSCALE:
            raise grad_scaler_unsupported()
        flat, _ = tree_flatten((args, kwargs or {}))
        first = next((a for a in flat if isinstance(a, HandedOver)), None)
        name, why = (first.param_name, first.why) if first is not None else ("a parameter", IN_PLACE)
        raise RuntimeError(
            f"zerocomm: the gradient of {name!r} was handed to zerocomm's gradient reduction "
            f"({why}), so p.grad cannot be read or changed from then until zero_grad() ({func}); "
            f"{CLIP_HINT}; for the global gradient norm use zopt.grad_norm(), to clamp values "
            "zopt.clip_grad_value_()"
        )
