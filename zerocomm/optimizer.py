"""ZeroOptimizer: the user's optimizer rebuilt over this rank's shard (ZeRO-1),
with gradient reduction overlapped with backward and the parameter sync
overlapped with the next forward (docs/design.md, "Data flow of one step" 3-4)."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from . import guards
from .grad_path import GradPath
from .hparams import HyperParams
from .layout import DPLayout
from .param_sync import ParamSync
from .plan import Plan
from .shard_buffers import LocalParam, ModeContext, ShardBuffers
from .shards import ShardedPlan, ShardPiece, StateFormat
from .validate import all_params, is_elementwise


class ZeroOptimizer(torch.optim.Optimizer):
    """Returned by `zerocomm.attach(model, optimizer)`. Behaves like the
    user's optimizer (step, zero_grad, param_groups, state, state_dict,
    load_state_dict) while holding only this rank's shard of its state."""

    # The attach() options this class takes (validate.check_options refuses others).
    OPTIONS = frozenset({"master_dtype", "average_grads", "elementwise", "pipeline_step", "shard_grads"})

    def __init__(
        self,
        chunks: list[nn.Module],
        optimizer: torch.optim.Optimizer,
        state_format: StateFormat,
        *,
        master_dtype: torch.dtype | None = None,
        average_grads: bool = True,
        elementwise: bool | None = None,
        pipeline_step: bool | None = None,
        shard_grads: bool = False,
        **sync_options: Any,
    ) -> None:
        mode = sync_options["mode"]
        name = type(optimizer).__name__
        self.mode = mode
        self.shard_grads = shard_grads
        # Step bucket by bucket in forward order, launching each bucket's sync
        # as soon as its shard is stepped: the first blocks' parameters are on
        # their way while later shards still step. Needs an optimizer whose
        # update of one tensor ignores the others, which element-wise ones are.
        # (attach checked the options: validate.check_options)
        self.pipeline_step = is_elementwise(optimizer, elementwise) if pipeline_step is None else pipeline_step
        self.average_grads = average_grads
        self.master_dtype = master_dtype
        self._user_optimizer = optimizer
        self._state_format = state_format
        self._index: dict[int, int] = {}  # id(param) -> index in the user's order
        self._group_of: dict[int, int] = {}
        self._user_params: list[torch.Tensor] = []
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                if id(p) not in self._index:
                    self._index[id(p)] = len(self._user_params)
                    self._group_of[id(p)] = gi
                    self._user_params.append(p)
        self.sync = ParamSync(chunks, **sync_options)
        self.units = self.sync.units
        self.device = sync_options["device"]
        # [Note: user writes between steps]: what the user may change between
        # steps, checked at the next step instead of silently ignored.
        planned = {id(s.param) for u in self.units for s in u.plan.params}
        names = {id(p): n for n, p in all_params(chunks)}
        self._param_names = tuple(names.get(id(p), f"param {i}") for i, p in enumerate(self._user_params))
        self._group_sizes = tuple(len(g["params"]) for g in optimizer.param_groups)
        self._user_params_view = tuple(self._user_params)
        self._unplanned = [
            (names.get(id(p), f"param {i}"), p) for i, p in enumerate(self._user_params) if id(p) not in planned
        ]
        self._versions: list[int] = []
        self._groups: list[list[tuple[int, int]]] = []  # see _step_groups
        self._grads_bound = False
        self._hooks: list[Any] = []
        ctx = ModeContext(self._index, self._group_of, master_dtype, self.device, average_grads)
        self.buffers = ShardBuffers(self.units, ctx, shard_grads)
        self._locals: list[LocalParam] = self.buffers.locals()
        self.grads = GradPath(self.units, self.buffers, average_grads)
        self.optim = self._build_local_optimizer(optimizer)
        self._hparams = HyperParams(optimizer, self.optim)  # either optimizer's hyper-parameter changes count
        self._pieces = tuple(ShardPiece(lp.index, lp.start, lp.numel, lp.group, lp.tensor) for lp in self._locals)
        self.defaults = self.optim.defaults
        # model.load_state_dict after attach: wait for the sync first (it
        # writes the parameters), then take the loaded values into the
        # masters, or the next step would silently undo the load.
        for c in chunks:
            self._hooks.append(c.register_load_state_dict_pre_hook(lambda *_: self.synchronize()))
            self._hooks.append(c.register_load_state_dict_post_hook(lambda *_: self.refresh_masters()))
            self._hooks.append(c.register_forward_pre_hook(self.grads.note_forward))
            # model.state_dict() reads the parameters: the sync must have landed
            self._hooks.append(c.register_state_dict_pre_hook(lambda *_: self.synchronize()))
        self._record_versions()
        # torch.optim.Optimizer bookkeeping (hooks used by LR schedulers and
        # profilers); the state itself lives in self.optim.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{name}.zero_grad"

    # -- construction -----------------------------------------------------
    def _build_local_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        groups = []
        for gi, g in enumerate(optimizer.param_groups):
            opts = {k: v for k, v in g.items() if k != "params"}
            groups.append({**opts, "params": [lp.tensor for lp in self._locals if lp.group == gi]})
        if not any(g["params"] for g in groups):
            # This rank owns nothing (more ranks than parameters): a
            # zero-element stand-in keeps the optimizer constructible.
            groups[0]["params"] = [nn.Parameter(torch.zeros(0, device=self.device))]
        # Every group carries its own hyper-parameters; defaults are passed
        # only as far as the constructor accepts them (AdamW records
        # 'decoupled_weight_decay' in defaults but takes no such argument).
        sig = inspect.signature(type(optimizer).__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
        kwargs = {k: v for k, v in optimizer.defaults.items() if takes_any or k in sig}
        local = type(optimizer)(groups, **kwargs)
        for g, user_g in zip(local.param_groups, optimizer.param_groups):
            g.update({k: v for k, v in user_g.items() if k != "params"})
        return local

    # -- gradient path ----------------------------------------------------
    def _bind_grads(self) -> None:
        """Point every local tensor's .grad at its reduced gradient (once per
        step: a cast copy bound here may already have been clipped)."""
        if self._grads_bound:
            return
        self._grads_bound = True
        self.buffers.bind_grads(self.grads.finish())

    def _local_grads(self) -> list[torch.Tensor]:
        return [lp.tensor.grad for lp in self._locals if lp.tensor.grad is not None]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation: backward passes inside do not communicate;
        the first backward outside reduces the accumulated gradients."""
        old, self.grads.sync_grads = self.grads.sync_grads, False
        try:
            yield
        finally:
            self.grads.sync_grads = old

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the true global gradient norm across all shards (as
        torch.nn.utils.clip_grad_norm_ would on the unsharded model); returns it."""
        total_norm = self.grad_norm(norm_type)
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for g in self._local_grads():
            g.mul_(coef.to(g.dtype))
        return total_norm

    def clip_grad_value_(self, clip_value: float) -> None:
        """Clamp every gradient element to [-clip_value, clip_value], as
        torch.nn.utils.clip_grad_value_ would on the reduced gradients of the
        unsharded model (element-wise: the shards' clamp is the whole one)."""
        self._bind_grads()
        for g in self._local_grads():
            g.clamp_(-clip_value, clip_value)

    def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """The global norm of the gradients the next step uses (averaged over
        the ranks, or DDP's), without changing them: for logging and spike
        detection. A collective over the group: call it on every rank."""
        self._bind_grads()
        norm_type = float(norm_type)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        # Summed over the shard group only: it holds every shard once, and
        # the replicas of a shard hold bitwise the same reduced gradient, so
        # the norm is the global one on every rank without counting any
        # shard M times ([Note: hierarchical layout]).
        for ui, u in enumerate(self.units):
            grads = [lp.tensor.grad for lp in self.buffers.locals(ui) if lp.tensor.grad is not None]
            if norm_type == math.inf:
                part = max(
                    (g.detach().abs().max().float() for g in grads if g.numel()),
                    default=torch.zeros((), device=self.device),
                )
                part = torch.as_tensor(part, dtype=torch.float32, device=self.device).clone()
                if u.transport.world_size > 1:
                    dist.all_reduce(part, op=dist.ReduceOp.MAX, group=u.group)
                total = torch.maximum(total, part)
            else:
                part = sum(
                    (g.detach().float().norm(norm_type) ** norm_type for g in grads),
                    torch.zeros((), device=self.device),
                )
                if u.transport.world_size > 1:
                    dist.all_reduce(part, group=u.group)
                total = total + part
        return total if norm_type == math.inf else total ** (1.0 / norm_type)

    # -- optimizer interface ----------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        if "_hparams" in self.__dict__:
            self._hparams.sync()
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        raise AttributeError("param_groups of a ZeroOptimizer are its local optimizer's")

    @property  # type: ignore[override]
    def state(self) -> dict:
        return self.optim.state

    @state.setter
    def state(self, value: dict) -> None:
        raise AttributeError("state of a ZeroOptimizer is its local optimizer's")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Wait for the reduced gradients, step this rank's shard, and launch
        the parameter sync (the next forward waits per block)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise guards.grad_scaler_unsupported()
        self._hparams.sync()
        self._hparams.stepped()
        guards.check_trainable(self._unplanned)
        with self.sync.launching() as launch:  # checks the parameter bindings first
            if launch.moved or self._versions_changed():
                self.refresh_masters()  # take up writes made outside zerocomm since the last step
            self._bind_grads()
            if self.pipeline_step:
                for group in self._step_groups():
                    self._step_group(group)
                    launch(group)
            else:
                self.optim.step()
                for ui, u in enumerate(self.units):
                    for b in range(len(u.buckets)):
                        self.buffers.write_back(ui, b)
                launch(self.sync.sequence)
        self._reset_grad_state()
        self._record_versions()
        return loss

    # GradScaler.step calls step() itself (setting grad_scale / found_inf)
    # instead of unscaling the local shards, so step() can refuse it clearly.
    _step_supports_amp_scaling = True

    def _plan_params(self) -> Iterator[torch.Tensor]:
        for u in self.units:
            for s in u.plan.params:
                yield s.param

    def _record_versions(self) -> None:
        self._versions = [p._version for p in self._plan_params()]

    def _versions_changed(self) -> bool:
        """A parameter written in place since the last step (nn.init.*_,
        copy_ of pretrained weights): the masters must take it up, or the
        step would silently undo the write (allgather mode, master_dtype)."""
        return any(p._version != v for p, v in zip(self._plan_params(), self._versions))

    def _step_group(self, group: list[tuple[int, int]]) -> None:
        """Step the local tensors of one step group ([Note: pipelined step]
        in docs/design.md), then write them back."""
        lps = [lp for uj, bj in group for lp in self.units[uj].buckets[bj].locals]
        if lps:
            keep = {id(lp.tensor) for lp in lps}
            saved = [g["params"] for g in self.optim.param_groups]
            try:
                for g in self.optim.param_groups:
                    g["params"] = [t for t in g["params"] if id(t) in keep]
                self.optim.step()
            finally:
                for g, params in zip(self.optim.param_groups, saved):
                    g["params"] = params
        for uj, bj in group:
            self.buffers.write_back(uj, bj)

    def _step_groups(self) -> list[list[tuple[int, int]]]:
        """The buckets in launch order, in groups of 1, 2, 4, ... buckets, so
        the first sync starts after one bucket is stepped while the number of
        optimizer.step() calls (each with a fixed cost in Python) stays
        logarithmic in the number of buckets."""
        seq = self.sync.sequence
        if sum(len(g) for g in self._groups) != len(seq):
            self._groups = []
            at, size = 0, 1
            while at < len(seq):
                self._groups.append(seq[at : at + size])
                at, size = at + size, 2 * size
        return self._groups

    def _reset_grad_state(self) -> None:
        """Unbind the reduction buffers from the local tensors (a model
        parameter gets its own grad back) and re-arm the bucket counters."""
        self.grads.reset()
        self.buffers.unbind_grads()
        self._grads_bound = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's: p.grad becomes None, or (set_to_none=False) zero in
        place (a view of zerocomm's gradient bucket, or a handed-over
        marker, which then counts as zero: [Note: handed-over gradients])."""
        self._reset_grad_state()
        for p in self._user_params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def synchronize(self) -> None:
        """Current stream waits for the parameter sync (call before reading
        parameters outside a forward pass)."""
        self.sync.synchronize()

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Take up working parameters written outside zerocomm (done by
        itself at the next step, and by `model.load_state_dict`). The step
        updates the masters (the flat shard itself in allgather mode, fp32
        copies under master_dtype) and the sync copies them over the
        parameters, so stale masters would silently undo the write. Elements
        whose working value still equals its master (rounded) keep the
        master's precision. Collective-free."""
        self.synchronize()
        for lp in self._locals:
            p = self._user_params[lp.index]
            if lp.tensor is p:  # broadcast mode, no master copy: the parameter itself
                continue
            working = p.detach().reshape(-1).narrow(0, lp.start, lp.numel)
            master = lp.tensor.detach().view(-1)
            changed = working != master.to(working.dtype)
            master[changed] = working[changed].to(master.dtype)

    # -- the public, read-only view (zerocomm.shards.ShardedOptimizer) ------
    @property
    def pieces(self) -> tuple[ShardPiece, ...]:
        """Every tensor the local optimizer steps, and where it belongs."""
        return self._pieces

    @property
    def user_params(self) -> tuple[torch.Tensor, ...]:
        """The model parameters in the user's optimizer order."""
        return self._user_params_view

    @property
    def user_group_sizes(self) -> tuple[int, ...]:
        """How many parameters each of the user's param groups holds."""
        return self._group_sizes

    @property
    def param_names(self) -> tuple[str, ...]:
        """The qualified name of each parameter in `user_params`."""
        return self._param_names

    @property
    def chunks(self) -> tuple[nn.Module, ...]:
        return tuple(self.sync.chunks)

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The group the dense plan shards over: the data-parallel group when
        flat, the shard group when hierarchical (`layouts` has the replicas)."""
        return self.units[0].group

    @property
    def process_groups(self) -> dict[str, dist.ProcessGroup | None]:
        """The group each plan (dense, expert) shards and syncs over."""
        return {u.name: u.group for u in self.units}

    @property
    def sharded_plans(self) -> tuple[ShardedPlan, ...]:
        """Each plan's parameters (user order) and group, dense first."""
        return tuple(
            ShardedPlan(
                u.name,
                tuple(self._index[id(s.param)] for s in u.plan.params if id(s.param) in self._index),
                u.group,
                u.transport.world_size,
            )
            for u in self.units
        )

    @property
    def world_size(self) -> int:
        """Ranks the dense plan shards over (the shard group's size)."""
        return self.units[0].transport.world_size

    @property
    def layouts(self) -> dict[str, DPLayout]:
        """The data-parallel layout of each plan (dense, expert): its shard
        group and the replicas of each shard ([Note: hierarchical layout])."""
        return {u.name: u.layout for u in self.units if u.layout is not None}

    def buffer_bytes(self) -> int:
        """Bytes of zerocomm's own buffers on this rank: parameter flats (the
        parameters themselves: they are views of them), gradient buffers,
        kept gradient shards and master copies."""
        flats = sum(f.numel() * f.element_size() for u in self.units for f in u.flats)
        return flats + self.buffers.nbytes()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.grads.diverged:  # reductions in flight that no peer will join: do not wait for them
            for u in self.units:
                u.sched.abort()
        self.grads.close()
        self.sync.close()  # waits for every outstanding sync and reduction first
        self.buffers.release_grads()

    @property
    def plan(self) -> Plan:
        return self.sync.plan

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError(
            "add_param_group after attach is not supported: add the group to the optimizer before zerocomm.attach"
        )

    # -- telemetry passthrough -------------------------------------------
    def enable_tracing(self, on: bool = True) -> None:
        self.sync.enable_tracing(on)

    def stats(self) -> dict:
        return self.sync.stats()

    def trace(self) -> list:
        return self.sync.trace()

    def export_chrome_trace(self, path: str) -> str:
        return self.sync.export_chrome_trace(path)

    def traffic(self) -> dict[str, dict[str, int]]:
        """Bytes handed to zerocomm's collectives, per tier (ParamSync.traffic)."""
        return self.sync.traffic()

    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state held by this rank (tensors only)."""
        return sum(
            v.numel() for s in self.optim.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
        )

    # -- checkpoint ---------------------------------------------------------
    def state_dict(self, to_rank: int | None = None) -> dict:
        """The unsharded optimizer's state_dict (collective over the group;
        with `to_rank` only that rank gets it). Sharded checkpoints:
        zerocomm.checkpoint."""
        return self._state_format.consolidated_state_dict(self, to_rank)

    def load_state_dict(self, state_dict: dict) -> None:
        self._state_format.load_consolidated_state_dict(self, state_dict)

    def __repr__(self) -> str:
        zero2 = ", shard_grads=True" if self.shard_grads else ""
        return f"ZeroOptimizer(mode={self.mode}{zero2}, optimizer={type(self.optim).__name__}, units={len(self.units)})"
