"""Checks done at attach, before zerocomm issues any collective of its own:
bad input raises a clear error, and ranks whose models differ fail together
instead of hanging in mismatched collectives."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from . import __version__
from .partition import build_plan

SYNCABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def trainable_params(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for c, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name if len(chunks) == 1 else f"chunk{c}.{name}", p))
    return out


def check_model(chunks: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> torch.device:
    """Returns the one device all trainable parameters live on."""
    for c in chunks:
        if not isinstance(c, nn.Module):
            raise TypeError(f"model must be an nn.Module or a list of them, got {type(c).__name__}")
    params = trainable_params(chunks)
    if not params:
        raise ValueError("the model has no trainable parameters (all are frozen or it has none)")
    first_name, first = params[0]
    for name, p in params:
        if p.device != first.device:
            raise ValueError(
                f"parameters on mixed devices: {first_name} is on {first.device} but {name} "
                f"is on {p.device}; move the model to one device first"
            )
        if p.dtype not in SYNCABLE_DTYPES:
            raise ValueError(f"parameter {name} has dtype {p.dtype}; zerocomm syncs floating "
                             f"parameters only ({', '.join(map(str, SYNCABLE_DTYPES))})")
        if not p.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous; make it contiguous before attach")
    for chunk in chunks:
        for mname, m in chunk.named_modules():
            if getattr(m, "sparse", False) is True:
                raise ValueError(
                    f"module {mname or type(m).__name__} produces sparse gradients (sparse=True), "
                    "which zerocomm cannot reduce; use sparse=False"
                )
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        in_model = {id(p) for _, p in params}
        frozen = {id(p) for c in chunks for p in c.parameters() if not p.requires_grad}
        in_opt = set()
        for gi, g in enumerate(optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                in_opt.add(id(p))
                if id(p) not in in_model and id(p) not in frozen:
                    raise ValueError(
                        f"optimizer param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) "
                        "is not a parameter of the model"
                    )
        missing = [n for n, p in params if id(p) not in in_opt]
        if missing:
            raise ValueError(
                f"{len(missing)} trainable parameter(s) are not in the optimizer, e.g. {missing[0]}; "
                "freeze them (requires_grad=False) or add them to a param group"
            )
    return first.device


def plan_fingerprint(
    chunks: list[nn.Module], *, mode: str, partition: str, bucket_mb: float,
    blocks: object, expert_filter: Callable | None,
) -> list[tuple]:
    """What every rank must agree on, as comparable rows."""
    plan = build_plan(chunks, mode=mode, world_size=1, partition=partition,
                      bucket_mb=bucket_mb, blocks=blocks)
    rows: list[tuple] = [("config", f"mode={mode} partition={partition} bucket_mb={bucket_mb} "
                          f"zerocomm={__version__}")]
    for b in plan.blocks:
        rows.append(("block", b.name))
        for i in b.params:
            s = plan.params[i]
            expert = bool(expert_filter(s.name, s.param)) if expert_filter else False
            rows.append(("param", f"{s.name} {tuple(s.shape)} {s.dtype}" + (" expert" if expert else "")))
    return rows


def check_plan_consistent(chunks: list[nn.Module], *, group: dist.ProcessGroup,
                          timeout_s: float, **kw: object) -> None:
    """Compare fingerprints across `group`; on mismatch EVERY rank raises,
    naming the first differing block or parameter and the ranks involved."""
    mine = plan_fingerprint(chunks, **kw)
    world = dist.get_world_size(group)
    if world == 1:
        return
    everyone: list[list[tuple] | None] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    ref = everyone[0]
    for r, rows in enumerate(everyone):
        if rows == ref:
            continue
        for i in range(max(len(ref), len(rows))):
            a = ref[i] if i < len(ref) else ("end", "<nothing>")
            b = rows[i] if i < len(rows) else ("end", "<nothing>")
            if a != b:
                raise ValueError(
                    f"zerocomm.attach: ranks disagree on the model/plan: rank 0 has {a[0]} {a[1]!r} "
                    f"where rank {r} has {b[0]} {b[1]!r} (entry {i}); every rank must build the "
                    "same model and call attach with the same arguments"
                )
