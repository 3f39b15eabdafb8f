"""What a user may have changed between two steps, found before it can make
a step silently differ from plain torch (see docs/design.md, [Note: user
writes between steps]).

- `GradWatch`: gradients handed to the reduction and then replaced or
  zeroed in place (any other use of the handed-over marker raises at the
  call: zerocomm/handed_over.py).
- `GradPresence`: which parameters have a gradient on *any* rank this step;
  torch's optimizers skip a parameter whose `.grad` is None, so a parameter
  without a gradient on every rank must not be stepped.
- `active_ddp`: the model runs inside `DistributedDataParallel`, whose own
  all-reduce then produces the gradients (reduce once, never twice).
- `check_trainable`: `requires_grad` turned on after attach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import divergence
from .transport import private_gloo

CLIP_HINT = (
    "clip with zopt.clip_grad_norm_(max_norm) (the true global norm), or wrap the model in "
    "DistributedDataParallel (then zerocomm steps DDP's all-reduced p.grad and torch's "
    "clip_grad_norm_ on model parameters is exact)"
)


def grad_scaler_unsupported() -> NotImplementedError:
    """GradScaler met at step() (its grad_scale / found_inf) or in its
    unscale_ (on a handed-over gradient)."""
    return NotImplementedError(
        "zerocomm: GradScaler (fp16 loss scaling) is not supported: its unscale_ and inf "
        "checks see only this rank's shard. Train in bf16 (no scaler needed), or scale the "
        "loss yourself and pass the inverse to zopt.clip_grad_norm_"
    )


def stale_gradient(name: str) -> RuntimeError:
    """A backward into a gradient a step has used, with no zero_grad() in
    between: torch would add to it, zerocomm no longer has it."""
    return RuntimeError(
        f"zerocomm: backward accumulated into the gradient of {name!r} left from the last "
        "step, whose buffer zerocomm's reduction has overwritten; call zopt.zero_grad() "
        "after every step (to accumulate gradients over micro-batches, use zopt.no_sync())"
    )


@dataclass
class _Handed:
    name: str
    param: torch.Tensor
    grad: torch.Tensor | None  # what p.grad is after hand-over: its HandedOver marker
    version: int


@dataclass
class GradWatch:
    """Remembers the marker each parameter's p.grad became at hand-over
    ([Note: gradient ownership], [Note: handed-over gradients]); replacing
    it, or zeroing it, before the step would be silently left out of the
    step, so `check()` raises instead."""

    handed: dict[int, _Handed] = field(default_factory=dict)  # id(param) -> its latest hand-over

    def record(self, name: str, p: torch.Tensor, grad: torch.Tensor | None) -> None:
        """`grad`: what p.grad is from now on (ZeRO-2 hands over every
        micro-batch: the latest hand-over is the one to check)."""
        if grad is not None or p.grad is None:
            self.handed[id(p)] = _Handed(name, p, grad, grad._version if grad is not None else 0)

    def check(self) -> None:
        for h in self.handed.values():
            g = h.param.grad
            if g is h.grad and (g is None or g._version == h.version):
                continue
            what = "set to None or replaced" if g is not h.grad else "modified in place"
            raise RuntimeError(
                f"zerocomm: the gradient of {h.name!r} was {what} after backward handed it to "
                "zerocomm's gradient reduction, so the change would be silently left out of the "
                f"step (e.g. torch.nn.utils.clip_grad_norm_(model.parameters()) or "
                f"GradScaler.unscale_ between backward and step); {CLIP_HINT}"
            )

    def clear(self) -> None:
        self.handed.clear()


@dataclass
class PresenceVote:
    """One step's OR of the presence flags, in flight, with every rank's
    position ([Note: diverged ranks])."""

    local: list[bool]
    flags: torch.Tensor | None
    work: Any  # dist.Work, None with one rank
    position: divergence.Position | None = None
    board: divergence.Board | None = None

    def result(self) -> list[bool]:
        if self.work is None or self.position is None or self.board is None:
            return self.local
        try:
            divergence.wait_vote(self.work, self.board, self.position)
        except divergence.Diverged:
            raise
        except Exception as e:
            raise RuntimeError(
                "zerocomm: exchanging which parameters have gradients (after every bucket's "
                f"gradient reduction, before the step) failed: {e}"
            ) from e
        assert self.flags is not None
        flags, positions = divergence.decode(self.flags, len(self.local), self.board.world)
        divergence.check(positions, self.board)
        return flags


class GradPresence:
    """OR over the ranks of "this parameter has a gradient", on a private
    gloo backend (host memory: no device sync on the CUDA path, and never the
    user's group, which may be busy with the user's own collectives)."""

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, timeout_s: float) -> None:
        self.backend: Any = None  # a ProcessGroupGloo backend
        self._flags: torch.Tensor | None = None  # reused every step: nothing allocated per step
        self.board: divergence.Board | None = None  # posts under the same store prefix
        if world_size > 1:
            gloo = private_gloo(group, "zerocomm-presence", timeout_s)
            self.backend = gloo.backend
            self.board = divergence.Board(dist.PrefixStore("board", gloo.store), dist.get_rank(group), world_size)

    def start(self, local: list[bool], position: divergence.Position) -> PresenceVote:
        """Issue the OR over the ranks (asynchronously: the caller waits for
        its reductions meanwhile); `PresenceVote.result()` waits for it."""
        if self.backend is None or self.board is None:
            return PresenceVote(local, None, None)
        n = len(local) + 2 * self.board.world
        if self._flags is None or self._flags.numel() != n:
            self._flags = torch.zeros(n, dtype=torch.int64)
        flags = self._flags
        divergence.encode_into(flags.numpy(), local, position, self.board.rank)  # no torch op
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        return PresenceVote(local, flags, self.backend.allreduce([flags], opts), position, self.board)

    def close(self, position: divergence.Position | None = None) -> None:
        if self.board is not None and position is not None:
            self.board.post_closed(position)
        self.backend = None


def active_ddp(module: nn.Module) -> DistributedDataParallel | None:
    """The DistributedDataParallel this forward of `module` runs inside, if any."""
    if isinstance(module, DistributedDataParallel):
        return module
    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None:
        return None
    inner = ddp.module
    return ddp if inner is module or any(m is module for m in inner.modules()) else None


def check_ddp(ddp: DistributedDataParallel, groups: list[dist.ProcessGroup | None], average_grads: bool) -> None:
    """zerocomm uses DDP's all-reduced gradients as its reduced gradients:
    only valid when DDP averages over exactly zerocomm's groups."""
    if not average_grads:
        raise ValueError(
            "zerocomm: the model is wrapped in DistributedDataParallel, which averages gradients, "
            "but attach(average_grads=False) asks for sums; drop average_grads=False or do not wrap "
            "the model in DDP"
        )
    ddp_ranks = dist.get_process_group_ranks(ddp.process_group)
    for g in groups:
        if dist.get_process_group_ranks(g) != ddp_ranks:
            raise ValueError(
                "zerocomm: the model is wrapped in DistributedDataParallel over ranks "
                f"{ddp_ranks}, but zerocomm reduces over ranks {dist.get_process_group_ranks(g)} "
                "(e.g. an expert_group); do not wrap the model in DDP: zerocomm reduces the "
                "gradients itself"
            )


def check_trainable(unplanned: list[tuple[str, torch.Tensor]]) -> None:
    """Parameters frozen at attach have no optimizer state and no sync slot:
    one made trainable since would silently never move."""
    for name, p in unplanned:
        if p.requires_grad or p.grad is not None:
            raise RuntimeError(
                f"zerocomm: parameter {name!r} was frozen (requires_grad=False) at attach and is "
                "trainable now; zerocomm holds no optimizer state or sync slot for it, so it would "
                "silently never move. Set requires_grad before zerocomm.attach, or re-attach: "
                "sd = zopt.state_dict(); zopt.close(); zopt = zerocomm.attach(model, optimizer, ...); "
                "zopt.load_state_dict(sd)"
            )
