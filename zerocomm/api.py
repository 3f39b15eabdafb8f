"""zerocomm.attach: validate the request, then build the parameter sync and,
with an optimizer, the sharded optimizer around it."""

from __future__ import annotations

from typing import Any, Callable, Sequence, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from . import __version__, optimizer_state
from .blocks import BlocksArg
from .layout import DPLayout, exchange_group, resolve_layout
from .optimizer import ZeroOptimizer
from .param_sync import ParamSync, plan_units
from .transport import SimulatedTransport, group_timeout_s, resolve_group
from .validate import check_model, check_options, check_plan_consistent, plan_fingerprint

_ATTACHED = "_zerocomm_handle"  # attribute on the model: one attach at a time


def attach(
    model: nn.Module | Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mode: str = "broadcast",
    group: dist.ProcessGroup | None = None,
    shard_group: dist.ProcessGroup | None = None,
    replicate_group: dist.ProcessGroup | None = None,
    mesh: Any = None,
    expert_group: dist.ProcessGroup | None = None,
    expert_filter: Callable[[str, nn.Parameter], bool] | None = None,
    blocks: BlocksArg = None,
    partition: str = "balanced",
    bucket_mb: float = 25.0,
    align_bytes: int = 16,
    transport: str | SimulatedTransport = "auto",
    timeout: float | None = None,
    high_priority: bool = False,
    zero_copy: bool | None = None,
    **optimizer_options: Any,
) -> ParamSync | ZeroOptimizer:
    """Shard `optimizer` (ZeRO-1) over `group` and overlap the parameter sync
    with the next forward pass. Without an optimizer, return the bare
    `ParamSync` handle for custom loops (`launch()`, `synchronize()`).

    mode: "broadcast" (any optimizer; whole parameters owned per rank) or
    "allgather" (element-wise optimizers; every bucket split evenly).
    Parameters become views of zerocomm's sync buffers (`zero_copy` is
    kept for compatibility and has no effect).

    Hierarchical ZeRO (as FSDP2's HSDP): `shard_group` + `replicate_group`,
    or `mesh` (a 2D DeviceMesh with dims ("replicate", "shard")): optimizer
    state and the parameter sync live inside the shard group; gradients are
    reduced inside it, then all-reduced across the replicas of each shard
    ([Note: hierarchical layout]).
    """
    chunks: list[nn.Module] = (
        list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [cast(nn.Module, model)]
    )
    resolve_group(group)  # not initialised: there are no peers to tell
    verdict_group = exchange_group(group, shard_group, mesh)
    # Every check runs before zerocomm's own collectives. The one exchange
    # below shares each rank's verdict, so a check that fails on one rank
    # only fails all of them instead of leaving the others waiting.
    error: Exception | None = None
    fingerprint: list[tuple] | None = None
    device: torch.device | None = None
    layout: DPLayout | None = None
    try:
        layout = resolve_layout(group, shard_group, replicate_group, mesh)
        check_options(
            mode=mode,
            partition=partition,
            bucket_mb=bucket_mb,
            align_bytes=align_bytes,
            timeout=timeout,
            transport=transport,
            expert_filter=expert_filter,
            optimizer=optimizer,
            optimizer_options=optimizer_options,
            optimizer_option_names=ZeroOptimizer.OPTIONS,
        )
        device = check_model(chunks, optimizer)
        for c in chunks:
            if getattr(c, _ATTACHED, None) is not None:
                raise ValueError("this model already has a zerocomm handle attached: call close() on it first")
        units = plan_units(
            chunks,
            mode=mode,
            layout=layout,
            expert_group=expert_group,
            expert_filter=expert_filter,
            transport=transport,
            partition=partition,
            bucket_mb=bucket_mb,
            align_bytes=align_bytes,
            blocks=blocks,
        )
        fingerprint = plan_fingerprint(
            [(u.name, u.plan) for u in units],
            optimizer=type(optimizer).__name__ if optimizer is not None else "none",
            version=__version__,
            options=f"shard_grads={optimizer_options.get('shard_grads', False)} layout={layout.describe()}",
        )
    except Exception as e:  # raised below, after the peers have heard of it
        error = e
    check_plan_consistent(
        fingerprint,
        error,
        group=verdict_group,
        device=device,
        layout=layout.facts() if layout is not None else None,
    )
    assert device is not None and layout is not None  # any failure was raised above
    timeout_s = float(timeout) if timeout is not None else group_timeout_s(layout.group)
    sync_options: dict[str, Any] = dict(
        mode=mode,
        units=units,
        transport=transport,
        timeout_s=timeout_s,
        high_priority=high_priority,
        device=device,
    )
    handle: ParamSync | ZeroOptimizer
    if optimizer is None:
        handle = sync = ParamSync(chunks, **sync_options)
    else:
        # attach hands the optimizer its state_dict format: it knows none itself
        handle = ZeroOptimizer(chunks, optimizer, optimizer_state, **sync_options, **optimizer_options)
        sync = handle.sync
    for c in chunks:
        setattr(c, _ATTACHED, handle)
    # closing the ParamSync (directly or through ZeroOptimizer.close) unmarks the model
    sync.attached_to = chunks
    return handle
