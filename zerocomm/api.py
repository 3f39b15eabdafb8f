"""zerocomm.attach: validate the request, then build the parameter sync and,
with an optimizer, the sharded optimizer around it."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .param_sync import ParamSync
from .partition import MODES, PARTITIONS
from .transport import SimulatedTransport, group_timeout_s, resolve_group
from .validate import check_model, check_plan_consistent

_ATTACHED = "_zerocomm_handle"  # attribute on the model: one attach at a time


def attach(
    model: nn.Module | Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mode: str = "broadcast",
    group: dist.ProcessGroup | None = None,
    expert_group: dist.ProcessGroup | None = None,
    expert_filter: Callable[[str, nn.Parameter], bool] | None = None,
    blocks: object = None,
    partition: str = "balanced",
    bucket_mb: float = 25.0,
    align_bytes: int = 16,
    transport: str | SimulatedTransport = "auto",
    timeout: float | None = None,
    high_priority: bool = False,
    zero_copy: bool = False,
    **optimizer_options: object,
):
    """Shard `optimizer` (ZeRO-1) over `group` and overlap the parameter sync
    with the next forward pass. Without an optimizer, return the bare
    `ParamSync` handle for custom loops (`launch()`, `synchronize()`).

    mode: "broadcast" (any optimizer; whole parameters owned per rank) or
    "allgather" (element-wise optimizers; every bucket split evenly).
    """
    chunks = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}: choose one of {', '.join(PARTITIONS)}")
    if not (0 < float(bucket_mb) <= 4096):
        raise ValueError(f"bucket_mb must be in (0, 4096] MiB, got {bucket_mb}")
    group = resolve_group(group)
    device = check_model(chunks, optimizer)
    for c in chunks:
        if getattr(c, _ATTACHED, None) is not None:
            raise ValueError(
                "this model already has a zerocomm handle attached: call close() on it first"
            )
    timeout_s = float(timeout) if timeout is not None else group_timeout_s(group)
    check_plan_consistent(chunks, mode=mode, partition=partition, bucket_mb=bucket_mb,
                          blocks=blocks, expert_filter=expert_filter, group=group, timeout_s=timeout_s)
    common = dict(
        mode=mode, group=group, expert_group=expert_group, expert_filter=expert_filter,
        blocks=blocks, partition=partition, bucket_mb=bucket_mb, align_bytes=align_bytes,
        transport=transport, timeout_s=timeout_s, high_priority=high_priority,
        zero_copy=zero_copy, device=device,
    )
    if optimizer is None:
        if optimizer_options:
            raise TypeError(f"unexpected options without an optimizer: {sorted(optimizer_options)}")
        handle = ParamSync(chunks, copy_in_params=True, **common)
    else:
        from .optimizer import ZeroOptimizer

        handle = ZeroOptimizer(chunks, optimizer, **common, **optimizer_options)
    for c in chunks:
        setattr(c, _ATTACHED, handle)
    handle._detach_from = chunks
    return handle
