"""Reads of an attached model's parameters outside a forward pass see the
values torch would show ([Note: reads after step] in docs/design.md).

After `step()` the parameter sync is still landing while the next forward
already runs; each block's forward pre-hook waits for its own buckets. A read
between `step()` and that forward (an EMA update, a logged norm, a
sub-module's `state_dict()`, `copy.deepcopy(model)`) must wait too, for just
the buckets it reads, and without costing the forward anything:

- From `launch()` until a chunk's next forward starts, every module of the
  chunk that holds parameters reads them through `_GuardedParams`, a stand-in
  for its `_parameters` dict whose `[]`, `get`, `items` and `values` wait for
  the parameter's bucket first. Every way torch reaches a parameter goes
  through that dict: attribute reads (`model.lm_head.weight`),
  `parameters()`, also of a wrapper such as DDP, `state_dict()`,
  `load_state_dict()`, `.to()`. The chunk's forward pre-hook puts the plain
  dicts back: inside the forward the block hooks order the reads.
- For the whole attachment every module of the model is of a subclass of its
  class (made here, named as it; as FSDP2's `fully_shard` does) whose
  `named_parameters()` waits lazily while a sync is pending, also inside a
  forward (HF models call `self.parameters()` there for `.dtype`: only the
  first parameter's bucket is waited for), whose `zero_grad()` never waits
  (it touches gradients only), and whose `__reduce_ex__` makes
  `copy.deepcopy` and pickling return the plain model: the class the user
  built, the synchronized values, no zerocomm hooks or attributes.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
from typing import Any, Iterator

import torch
import torch.nn as nn

from .hooks import BlockHooks, Wait

_READS = "_zerocomm_reads"  # instance attribute: the ModuleReads of the handle


def _from_zerocomm(fn: Any) -> bool:
    """Was this hook defined by zerocomm (looking through bound methods,
    partials and torch's hook wrappers)?"""
    for _ in range(8):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__func__"):
            fn = fn.__func__
        elif not isinstance(fn, nn.Module) and callable(getattr(fn, "hook", None)):
            fn = fn.hook  # torch.nn.modules.module._WrappedHook
        else:
            break
    name = getattr(fn, "__module__", None) or ""
    return name == "zerocomm" or name.startswith("zerocomm.")


def plain_state(module: nn.Module) -> dict[str, Any]:
    """The module's `__dict__` as it would be without zerocomm: no
    `_zerocomm_*` attributes, no zerocomm hooks, the plain parameter dict."""
    state = dict(module.__dict__)
    for key in [k for k in state if k.startswith("_zerocomm")]:
        del state[key]
    params = state.get("_parameters")
    if isinstance(params, _GuardedParams):
        state["_parameters"] = params.orig
    ours = {
        hid
        for key, hooks in state.items()
        if "hooks" in key and isinstance(hooks, dict)
        for hid, fn in hooks.items()
        if callable(fn) and _from_zerocomm(fn)
    }
    if ours:  # the *_with_kwargs / *_always_called dicts share the hooks' ids
        for key, hooks in list(state.items()):
            if "hooks" in key and isinstance(hooks, dict) and not ours.isdisjoint(hooks):
                state[key] = type(hooks)((hid, fn) for hid, fn in hooks.items() if hid not in ours)
    return state


class _AttachedReads:
    """Mixed in before the class of every module of an attached model."""

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        items = super().named_parameters(prefix, recurse, remove_duplicate)  # type: ignore[misc]
        reads = self.__dict__.get(_READS)
        return items if reads is None else reads.waiting(items)

    def zero_grad(self, set_to_none: bool = True) -> None:
        reads = self.__dict__.get(_READS)
        with reads.quiet() if reads is not None else contextlib.nullcontext():
            super().zero_grad(set_to_none)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        reads = self.__dict__.get(_READS)
        if reads is not None:
            reads.wait_all()
        # copyreg._reconstructor: object.__new__(the model's class), then
        # __setstate__(state); pickle refuses __newobj__ with another class
        base = type(self)._zerocomm_base  # type: ignore[attr-defined]
        return copyreg._reconstructor, (base, object, None), plain_state(self)  # type: ignore[attr-defined,arg-type]


class _GuardedParams(dict):
    """A module's `_parameters` while its chunk's sync is landing: each read
    of a parameter waits for its bucket; writes go to the real dict too."""

    def __init__(self, orig: dict, reads: "ModuleReads") -> None:
        super().__init__(orig)
        self.orig = orig
        self.reads = reads

    def __getitem__(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        self.reads.wait_tensor(value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = dict.get(self, key, default)
        self.reads.wait_tensor(value)
        return value

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        for key, value in dict.items(self):
            self.reads.wait_tensor(value)
            yield key, value

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        for value in dict.values(self):
            self.reads.wait_tensor(value)
            yield value

    def __setitem__(self, key: str, value: Any) -> None:
        self.orig[key] = value
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        del self.orig[key]
        dict.__delitem__(self, key)

    def pop(self, key: str, *default: Any) -> Any:
        self.orig.pop(key, *default)
        return dict.pop(self, key, *default)


class ModuleReads:
    """Owned by one ParamSync: the per-module subclasses, the guarded
    parameter dicts and which launched buckets a read must still wait for."""

    def __init__(self, chunks: list[nn.Module], waits_of: dict[int, list[Wait]], hooks: BlockHooks, cuda: bool) -> None:
        self.hooks = hooks
        self.cuda = cuda  # waits are per stream there: never taken as done
        self._waits_of = waits_of  # id(param) -> the buckets holding it
        self._pending: set[Wait] = set()
        self._quiet = 0
        self._classes: dict[type, type] = {}
        self._modules: list[nn.Module] = []
        self._holders: dict[nn.Module, list[nn.Module]] = {}  # chunk -> modules with parameters
        self._chunk_waits: dict[nn.Module, set[Wait]] = {}
        self._guarded: set[nn.Module] = set()
        self._handles: list[Any] = []
        for chunk in chunks:
            mods = list(chunk.modules())
            self._holders[chunk] = [m for m in mods if m._parameters]
            params = [p for m in mods for p in m._parameters.values()]
            self._chunk_waits[chunk] = {w for p in params for w in waits_of.get(id(p), ())}
            for m in mods:
                if _READS not in m.__dict__:
                    m.__dict__[_READS] = self
                    m.__class__ = self._attached_class(type(m))
                    self._modules.append(m)
            self._handles.append(chunk.register_forward_pre_hook(functools.partial(self._enter_forward, chunk)))
            self._handles.append(
                chunk.register_forward_hook(functools.partial(self._leave_forward, chunk), always_call=True)
            )

    def _attached_class(self, base: type) -> type:
        cls = self._classes.get(base)
        if cls is None:
            attrs = {"__module__": base.__module__, "__qualname__": base.__qualname__, "_zerocomm_base": base}
            cls = self._classes[base] = type(base.__name__, (_AttachedReads, base), attrs)
        return cls

    # -- the sync's life cycle (called by ParamSync) -------------------------
    def launched(self, waits: list[Wait]) -> None:
        """A sync was launched: reads wait until the next forward of each chunk."""
        self._pending = set(waits)
        for chunk in self._holders:
            self._guard(chunk)

    def settled(self) -> None:
        """Everything launched has landed (synchronize())."""
        self._pending = set()
        for chunk in self._holders:
            self._unguard(chunk)

    def remove(self) -> None:
        self.settled()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._modules:
            if m.__dict__.get(_READS) is self:
                del m.__dict__[_READS]
                m.__class__ = type(m)._zerocomm_base  # type: ignore[attr-defined]
        self._modules.clear()
        # forget the schedulers (as BlockHooks.remove does): close() decides
        # when they are destroyed, never a later garbage collection
        self._waits_of, self._chunk_waits, self._holders = {}, {}, {}

    # -- waits ---------------------------------------------------------------
    def wait_tensor(self, t: Any) -> None:
        if not self._pending or self._quiet or t is None:
            return
        for w in self._waits_of.get(id(t), ()):
            if w in self._pending:
                sched, bucket = w
                sched.wait_param(bucket)
                if not self.cuda:  # the host waited: landed for every reader
                    self._pending.discard(w)

    def wait_all(self) -> None:
        for w in list(self._pending):
            sched, bucket = w
            sched.wait_param(bucket)
        if not self.cuda:
            self.settled()

    def waiting(self, items: Iterator[tuple[str, nn.Parameter]]) -> Iterator[tuple[str, nn.Parameter]]:
        for item in items:
            self.wait_tensor(item[1])
            yield item

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Reads inside touch no values (zero_grad): they wait for nothing."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    # -- forward -------------------------------------------------------------
    def _guard(self, chunk: nn.Module) -> None:
        if chunk in self._guarded:
            return
        self._guarded.add(chunk)
        for m in self._holders[chunk]:
            m.__dict__["_parameters"] = _GuardedParams(m.__dict__["_parameters"], self)

    def _unguard(self, chunk: nn.Module) -> None:
        if chunk not in self._guarded:
            return
        self._guarded.discard(chunk)
        for m in self._holders[chunk]:
            params = m.__dict__["_parameters"]
            if isinstance(params, _GuardedParams):
                m.__dict__["_parameters"] = params.orig

    def _enter_forward(self, chunk: nn.Module, module: nn.Module, args: object) -> None:
        self._unguard(chunk)  # the block pre-hooks order the forward's reads

    def _leave_forward(self, chunk: nn.Module, module: nn.Module, args: object, output: object) -> None:
        # After a forward that completed, the block hooks waited for every
        # bucket of the chunk; after one that raised, some may still land.
        waits = self._chunk_waits[chunk]
        if waits.isdisjoint(self.hooks.pending):
            if not self.cuda:
                self._pending -= waits
        elif not self._pending.isdisjoint(waits):
            self._guard(chunk)


def build(chunks: list[nn.Module], units: list[Any], hooks: BlockHooks, device: torch.device) -> ModuleReads:
    """The ModuleReads of a ParamSync's units (each unit: `.plan`, `.sched`,
    `.buckets`: one record per bucket with the scheduler id of its sync)."""
    waits_of: dict[int, list[Wait]] = {}
    for u in units:
        for b, rec in zip(u.plan.buckets, u.buckets):
            for i in b.params:
                waits_of.setdefault(id(u.plan.params[i].param), []).append((u.sched, rec.param_id))
    return ModuleReads(chunks, waits_of, hooks, device.type == "cuda")
