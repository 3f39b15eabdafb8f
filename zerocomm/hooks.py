"""Forward pre-hooks: each block's forward waits for its own parameters.

The wait is `SyncScheduler.wait_param`: on CUDA the current stream waits on
the bucket's event (GPU-side, no host sync); on CPU the host blocks on the
bucket's completion flag. Nothing here calls `Work.wait()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

Wait = tuple[Any, int]  # (SyncScheduler, param bucket id)


@dataclass
class BlockHooks:
    """Owns the hooks of one ParamSync. `waits[module]` lists the buckets a
    block needs; `roots[chunk]` the buckets of the blocks inside a model
    chunk, whose post-hook orders those the forward skipped before the next
    step writes them (per chunk, so pipeline chunks keep their overlap)."""

    waits: dict[nn.Module, list[Wait]]
    roots: dict[nn.Module, set[Wait]]
    on_first_call: Callable[[nn.Module], None] | None = None
    armed: bool = False
    tracer: Any = None  # telemetry.Tracer when enabled
    _pending: set[Wait] = field(default_factory=set)
    _handles: list[RemovableHandle] = field(default_factory=list)

    def install(self) -> None:
        for module in self.waits:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._post_hook))
        for root in self.roots:
            self._handles.append(root.register_forward_hook(self._root_post_hook))

    def remove(self) -> None:
        """Uninstall; also forget the schedulers, so that close() decides
        when they are destroyed."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.waits, self.roots, self._pending = {}, {}, set()
        self.tracer = None
        self.on_first_call = None

    @property
    def pending(self) -> set[Wait]:
        """Launched buckets no forward has waited for yet (read-only)."""
        return self._pending

    def arm(self, launched: list[Wait]) -> None:
        """Called by launch(): from now on blocks wait for these buckets."""
        self.armed = True
        self._pending = set(launched)

    def _pre_hook(self, module: nn.Module, args: object) -> None:
        if self.on_first_call is not None:
            self.on_first_call(module)
        if self.armed:
            for w in self.waits[module]:
                sched, bucket = w
                sched.wait_param(bucket)
                self._pending.discard(w)
        if self.tracer is not None:  # after the waits: compute and wait lanes never overlap
            self.tracer.begin_block(module)

    def _post_hook(self, module: nn.Module, args: object, output: object) -> None:
        if self.tracer is not None:
            self.tracer.end_block(module)

    def _root_post_hook(self, module: nn.Module, args: object, output: object) -> None:
        # A block the forward skipped never waited: order its bucket now, so
        # the optimizer step after backward cannot overwrite what is in flight.
        for w in list(self._pending & self.roots[module]):
            sched, bucket = w
            sched.wait_param(bucket)
            self._pending.discard(w)
