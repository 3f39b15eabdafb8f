"""The gradient path of the sharded optimizer (docs/design.md, "Data flow of
one step" 3): post-accumulate-grad hooks hand each bucket to the reduction
as soon as backward has produced all its gradients; `finish()` launches the
rest, waits, and agrees across ranks which parameters have a gradient."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from . import divergence, guards
from .shard_buffers import ShardBuffers
from .sync_unit import SyncUnit


@dataclass
class GradState:
    """Per unit: which gradient buckets are ready and how far we launched."""

    order: list[int]  # fixed launch order, identical on every rank
    pending: list[int]  # params still missing per bucket
    launched: int = 0
    bucket_of: dict[int, int] = field(default_factory=dict)  # id(param) -> bucket
    fired: set[int] = field(default_factory=set)  # id(param) whose grad was handed over this step


class GradPath:
    """Owns the gradient hooks, the per-step reduction state and the checks
    on gradients users touch ([Note: gradient ownership], [Note: DDP-wrapped
    models] in docs/design.md)."""

    def __init__(self, units: list[SyncUnit], buffers: ShardBuffers, average_grads: bool) -> None:
        self.units = units
        self.buffers = buffers
        self.average_grads = average_grads
        self.sync_grads = True  # False inside no_sync(): backward only accumulates
        self.ddp: nn.Module | None = None  # the DDP wrapper whose all-reduce made this step's grads
        self.has_grad: list[list[bool]] | None = None  # per unit, per plan param, once finished
        self._watch = guards.GradWatch()
        self.position = divergence.Position()  # carried by every vote: [Note: diverged ranks]
        self.diverged = False  # then collectives are in flight that no peer will join
        self._presence = [guards.GradPresence(u.group, u.transport.world_size, u.transport.timeout_s) for u in units]
        self._handles: list[Any] = []
        self._states = [self._arm(ui, u) for ui, u in enumerate(units)]

    def _arm(self, ui: int, u: SyncUnit) -> GradState:
        # Backward produces grads roughly in reverse forward order; the order
        # is fixed so every rank issues the reductions identically.
        plan = u.plan
        st = GradState(order=list(reversed(range(len(plan.buckets)))), pending=[len(b.params) for b in plan.buckets])
        for b in plan.buckets:
            for i in b.params:
                p = plan.params[i].param
                st.bucket_of[id(p)] = b.index
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(ui, plan.params[i].name)))
        return st

    def _hook(self, ui: int, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if not self.sync_grads or self.ddp is not None:
                return  # accumulating, or DDP reduces: [Note: DDP-wrapped models]
            st = self._states[ui]
            if id(p) in st.fired:
                # Its bucket may already be reduced (read on the comm stream):
                # the grad added now would silently be left out of the step.
                raise RuntimeError(
                    f"zerocomm: the gradient of {name!r} was accumulated again after it was "
                    "handed to the reduction in this step; for gradient accumulation run "
                    "every backward but the last inside zopt.no_sync()"
                )
            st.fired.add(id(p))
            st.pending[st.bucket_of[id(p)]] -= 1
            self._launch_ready(ui, flush=False)

        return hook

    def _launch_ready(self, ui: int, flush: bool) -> None:
        u, st = self.units[ui], self._states[ui]
        while st.launched < len(st.order):
            b = st.order[st.launched]
            if st.pending[b] > 0 and not flush:
                return
            grads = []
            for i in u.plan.buckets[b].params:
                spec = u.plan.params[i]
                self._watch.record(spec.name, spec.param)
                g = spec.param.grad
                grads.append(g.detach() if g is not None else torch.zeros_like(spec.param))
            self.position.reduction_started()
            u.sched.reduce_grads(b, grads, self.average_grads)
            st.launched += 1

    def note_forward(self, module: nn.Module, args: object) -> None:
        """Forward pre-hook on each model chunk: does this forward run inside DDP?"""
        ddp = guards.active_ddp(module)
        if ddp is not None and ddp is not self.ddp:
            guards.check_ddp(ddp, [u.group for u in self.units], self.average_grads)
        self.ddp = ddp

    def finish(self) -> list[list[bool]]:
        """Launch what backward has not, make the compute stream wait, and
        agree across ranks which parameters have a gradient this step."""
        if self.has_grad is not None:
            return self.has_grad
        local = [[s.param.grad is not None for s in u.plan.params] for u in self.units]
        if self.ddp is not None:
            for ui in range(len(self.units)):
                self.buffers.take_local_grads(ui)
            self.has_grad = local  # DDP's all-reduce already made them agree
            return local
        for ui in range(len(self.units)):
            self._launch_ready(ui, flush=True)
        # the presence vote travels while the last reductions finish
        self.position.steps += 1
        votes = [pres.start(flags, self.position) for pres, flags in zip(self._presence, local)]
        try:
            # The vote first: a rank behind a divergence is stuck in a reduction
            # nobody joins, but its vote completes and says so ([Note: diverged ranks]).
            has_grad = [v.result() for v in votes]
        except divergence.Diverged:
            self.diverged = True
            raise
        except RuntimeError:
            self._wait_grads()  # a dead peer is reported as the failed reduction it is
            raise
        try:
            self._wait_grads()
        except RuntimeError as e:  # behind a divergence a peer detected: say so
            self.diverged = True
            divergence.explain(e, [pres.board for pres in self._presence])
            raise
        self.has_grad = has_grad
        self._watch.check()
        return self.has_grad

    def _wait_grads(self) -> None:
        for u in self.units:
            for b in range(len(u.plan.buckets)):
                u.sched.wait_grad(b)

    def reset(self) -> None:
        """Re-arm the bucket counters for the next step."""
        for u, st in zip(self.units, self._states):
            st.launched = 0
            st.pending = [len(b.params) for b in u.plan.buckets]
            st.fired.clear()
        self.position.step_reset()
        self._watch.clear()
        self.has_grad = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for pres in self._presence:
            pres.close(self.position)
