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
from .handed_over import HandedOver
from .shard_buffers import ShardBuffers
from .sync_unit import SyncUnit


@dataclass
class GradState:
    """Per unit: which gradient buckets are ready and how far we launched."""

    order: list[int]  # fixed launch order, identical on every rank
    pending: list[int]  # params still missing per bucket
    launched: int = 0
    where: dict[int, tuple[int, int]] = field(default_factory=dict)  # id(param) -> (bucket, slot in it)
    fired: set[int] = field(default_factory=set)  # id(param) whose grad was handed over this step
    had_grad: set[int] = field(default_factory=set)  # id(param) with a gradient this step (released ones too)
    landed: set[int] = field(default_factory=set)  # id(param) moved into its bucket since the last step


class GradPath:
    """Owns the gradient hooks, the per-step reduction state and the checks
    on gradients users touch ([Note: gradient ownership], [Note: gradient
    views], [Note: DDP-wrapped models] in docs/design.md)."""

    def __init__(self, units: list[SyncUnit], buffers: ShardBuffers, average_grads: bool) -> None:
        self.units = units
        self.buffers = buffers
        self.modes = buffers.modes
        self.average_grads = average_grads
        self.sync_grads = True  # False inside no_sync(): backward only accumulates
        self.ddp: nn.Module | None = None  # the DDP wrapper whose all-reduce made this step's grads
        self.has_grad: list[list[bool]] | None = None  # per unit, per plan param, once finished
        self._watch = guards.GradWatch()
        self.position = divergence.Position()  # carried by every vote: [Note: diverged ranks]
        self.diverged = False  # then collectives are in flight that no peer will join
        # over every rank of the layout: replicas vote too ([Note: hierarchical layout])
        self._presence = [
            guards.GradPresence(
                u.data_parallel_group, u.transport.world_size * u.transport.replica_size, u.transport.timeout_s
            )
            for u in units
        ]
        self._handles: list[Any] = []
        self._states = [self._arm(ui, u) for ui, u in enumerate(units)]
        self._in_flight = False  # reductions launched and not yet waited for
        self._backward_open = False  # ZeRO-2: the end-of-backward flush is queued

    def _arm(self, ui: int, u: SyncUnit) -> GradState:
        # Backward produces grads roughly in reverse forward order; the order
        # is fixed so every rank issues the reductions identically.
        plan = u.plan
        st = GradState(order=list(reversed(range(len(plan.buckets)))), pending=[len(b.params) for b in plan.buckets])
        for b in plan.buckets:
            for k, i in enumerate(b.params):
                p = plan.params[i].param
                st.where[id(p)] = (b.index, k)
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(ui, plan.params[i].name)))
                self._handles.append(p.register_hook(self._drop_marker(p)))
        return st

    @staticmethod
    def _drop_marker(p: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """Before backward accumulates into `p`: a gradient handed over
        earlier in this step is with the reduction already (start from None:
        ZeRO-2 adds it to the kept slice; ZeRO-1's hook then refuses it);
        one a step has used needed zero_grad() first ([Note: handed-over
        gradients])."""

        def pre_hook(grad: torch.Tensor) -> None:
            marker = p.grad
            if isinstance(marker, HandedOver):
                if marker.stale and not marker.zeroed:
                    raise guards.stale_gradient(marker.param_name)
                p.grad = None

        return pre_hook

    def _hook(self, ui: int, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if self.ddp is not None:
                return  # DDP reduces: [Note: DDP-wrapped models]
            st, mode = self._states[ui], self.modes[ui]
            b, k = st.where[id(p)]
            if id(p) in st.fired:
                # Its bucket may already be reduced (read on the comm stream):
                # the grad added now would silently be left out of the step.
                raise RuntimeError(
                    f"zerocomm: the gradient of {name!r} was accumulated again after it was "
                    "handed to the reduction in this step; for gradient accumulation run "
                    "every backward but the last inside zopt.no_sync()"
                )
            if mode.keeps_grads:
                if id(p) not in st.landed:
                    mode.land(self.units[ui].buckets[b], k, p)
                    st.landed.add(id(p))
                if not self.sync_grads:
                    return  # accumulating: backward adds into the bucket in place
            elif not self._backward_open:
                # ZeRO-2: every backward reduces each bucket once, also inside
                # no_sync(); the rest are flushed when this backward ends
                self._backward_open = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            st.fired.add(id(p))
            st.had_grad.add(id(p))
            st.pending[b] -= 1
            self._launch_ready(ui, flush=False)

        return hook

    def _end_backward(self) -> None:
        """ZeRO-2: the end of a backward: flush every bucket not reduced in
        it, then re-arm the counters for the next backward."""
        self._backward_open = False
        for ui, st in enumerate(self._states):
            if self.modes[ui].keeps_grads:
                continue
            self._launch_ready(ui, flush=True)
            st.launched = 0
            st.pending = [len(b.params) for b in self.units[ui].plan.buckets]
            st.fired.clear()

    def _launch_ready(self, ui: int, flush: bool) -> None:
        u, st, mode = self.units[ui], self._states[ui], self.modes[ui]
        while st.launched < len(st.order):
            b = st.order[st.launched]
            if st.pending[b] > 0 and not flush:
                return
            self.position.reduction_started()
            mode.hand_over(u.buckets[b], st.fired, self._watch.record)
            self._in_flight = True
            st.launched += 1

    def note_forward(self, module: nn.Module, args: object) -> None:
        """Forward pre-hook on each model chunk: does this forward run inside
        DDP? Also orders a reduction left running by a step that never came
        before backward writes into its bucket again."""
        ddp = guards.active_ddp(module)
        if ddp is not None and ddp is not self.ddp:
            guards.check_ddp(ddp, [u.data_parallel_group for u in self.units], self.average_grads)
        self.ddp = ddp
        if self._in_flight and self.has_grad is None and not any(st.launched for st in self._states):
            self._wait_all()

    def _wait_all(self) -> None:
        for u in self.units:  # first: a dead peer is reported as the failed reduction it is
            for rec in u.buckets:
                u.sched.wait_grad(rec.grad_id)
        self._in_flight = False

    def finish(self) -> list[list[bool]]:
        """Launch what backward has not, make the compute stream wait, and
        agree across ranks which parameters have a gradient this step."""
        if self.has_grad is not None:
            return self.has_grad
        local = [
            [s.param.grad is not None or id(s.param) in st.had_grad for s in u.plan.params]
            for u, st in zip(self.units, self._states)
        ]
        if self.ddp is not None:
            for u, mode in zip(self.units, self.modes):
                for rec in u.buckets:
                    mode.take_local(rec)
            self.has_grad = local  # DDP's all-reduce already made them agree
            return local
        for ui in range(len(self.units)):
            if self.modes[ui].keeps_grads or not any(self._states[ui].had_grad):
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
            self._wait_all()  # a dead peer is reported as the failed reduction it is
            raise
        try:
            self._wait_all()
        except RuntimeError as e:  # behind a divergence a peer detected: say so
            self.diverged = True
            divergence.explain(e, [pres.board for pres in self._presence])
            raise
        for mode in self.modes:
            mode.after_wait()
        self.has_grad = has_grad
        self._watch.check()
        return self.has_grad

    def reset(self) -> None:
        """Re-arm the bucket counters for the next step."""
        for u, st in zip(self.units, self._states):
            st.launched = 0
            st.pending = [len(b.params) for b in u.plan.buckets]
            st.fired.clear()
            st.had_grad.clear()
            st.landed.clear()
        for mode in self.modes:
            mode.new_step()
        self.position.step_reset()
        self._watch.clear()
        self.has_grad = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for pres in self._presence:
            pres.close(self.position)
