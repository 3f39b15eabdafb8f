"""Checks done at attach, before zerocomm issues any collective of its own:
bad input raises a clear error, and ranks whose models differ fail together
instead of hanging in mismatched collectives."""

from __future__ import annotations

import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .blocks import chunk_prefix
from .layout import LayoutFacts, describe_bad_tiling
from .plan import Plan, check_plan_options

SYNCABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def all_params(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Every parameter once, by its first qualified name."""
    seen: set[int] = set()
    out = []
    for c, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((chunk_prefix(c, len(chunks)) + name, p))
    return out


def trainable_params(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in all_params(chunks) if p.requires_grad]


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
            raise ValueError(
                f"parameter {name} has dtype {p.dtype}; zerocomm syncs floating "
                f"parameters only ({', '.join(map(str, SYNCABLE_DTYPES))})"
            )
        if p.grad is not None and p.grad.layout != torch.strided:
            raise ValueError(f"parameter {name} has a sparse gradient ({p.grad.layout}), which zerocomm cannot reduce")
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


def check_options(
    *,
    mode: str,
    partition: str,
    bucket_mb: object,
    align_bytes: object,
    timeout: object,
    transport: object,
    expert_filter: object,
    optimizer: torch.optim.Optimizer | None,
    optimizer_options: dict,
    optimizer_option_names: frozenset[str] = frozenset(),
) -> None:
    """Arguments alone, before the model or any process group is looked at.
    `optimizer_option_names`: the options the sharded optimizer takes."""
    from .transport import SimulatedTransport

    check_plan_options(mode=mode, partition=partition, bucket_mb=bucket_mb, align_bytes=align_bytes)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds (or None), got {timeout!r}")
    if not (transport == "auto" or isinstance(transport, SimulatedTransport)):
        raise ValueError(f"unknown transport {transport!r}: use 'auto' or zerocomm.transport.SimulatedTransport(...)")
    if expert_filter is not None and not callable(expert_filter):
        raise TypeError(f"expert_filter must be a callable (name, param) -> bool, got {type(expert_filter).__name__}")
    if optimizer is None:
        if optimizer_options:
            raise TypeError(f"unexpected options without an optimizer: {sorted(optimizer_options)}")
        return
    unknown = sorted(set(optimizer_options) - optimizer_option_names)
    if unknown:
        raise TypeError(f"unexpected attach options {unknown}: expected any of {sorted(optimizer_option_names)}")
    master = optimizer_options.get("master_dtype")
    if master is not None and not (isinstance(master, torch.dtype) and master.is_floating_point):
        raise TypeError(f"master_dtype must be a floating dtype, got {master}")
    shard_grads = optimizer_options.get("shard_grads", False)
    if not isinstance(shard_grads, bool):
        raise TypeError(f"shard_grads must be True or False, got {shard_grads!r}")
    if shard_grads and mode != "allgather":
        raise ValueError(
            "shard_grads=True (ZeRO-2: keep only this rank's slice of the reduced gradients) "
            "needs mode='allgather', where every rank owns a slice of every bucket"
        )
    if mode == "allgather" and not is_elementwise(optimizer, optimizer_options.get("elementwise")):
        raise ValueError(
            f"{type(optimizer).__name__} is not an element-wise optimizer, so it cannot step slices of "
            "parameters (allgather mode): use mode='broadcast', which steps whole "
            "parameters, or pass elementwise=True if its update really is element-wise"
        )


# Optimizers whose update of an element depends only on that element's own
# gradient and state: safe to step on arbitrary slices (allgather mode).
ELEMENTWISE = frozenset(
    {
        "SGD",
        "Adam",
        "AdamW",
        "Adagrad",
        "Adadelta",
        "Adamax",
        "NAdam",
        "RAdam",
        "RMSprop",
        "ASGD",
        "Rprop",
        "Lion",
    }
)


def is_elementwise(optimizer: torch.optim.Optimizer, elementwise: bool | None) -> bool:
    """Whether the optimizer's update is element-wise (`elementwise`
    overrides the list); allgather mode steps slices and needs one."""
    return type(optimizer).__name__ in ELEMENTWISE if elementwise is None else bool(elementwise)


def plan_fingerprint(
    plans: list[tuple[str, Plan]], *, optimizer: str = "none", version: str = "", options: str = ""
) -> list[tuple]:
    """What every rank must agree on, as comparable rows: the options
    (`options`: those that change which collectives run, e.g. shard_grads),
    the zerocomm version (attach passes it) and every (name, plan) attach built."""
    first = plans[0][1]
    rows: list[tuple] = [
        (
            "config",
            f"mode={first.mode} partition={first.partition} "
            f"bucket_mb={first.bucket_mb} align_bytes={first.align_bytes} optimizer={optimizer} "
            f"experts={len(plans) > 1} zerocomm={version}" + (f" {options}" if options else ""),
        )
    ]
    for name, plan in plans:
        if name != plans[0][0]:  # the first (dense) plan's rows start right after the config
            rows.append(("plan", f"{name} over {plan.world_size} ranks"))
        for b in plan.blocks:
            rows.append(("block", b.name))
            for i in b.params:
                s = plan.params[i]
                rows.append(("param", f"{s.name} {tuple(s.shape)} {s.dtype}"))
    return rows


def describe_mismatch(everyone: list[list[tuple]], ranks: list[int]) -> str | None:
    """None when all fingerprints agree; otherwise the first differing entry
    and which (global) ranks hold which value there."""
    if all(rows == everyone[0] for rows in everyone):
        return None
    end = ("end", "<no more entries>")
    i = 0
    while len({tuple(rows[i]) if i < len(rows) else end for rows in everyone}) == 1:
        i += 1
    holders: dict[tuple, list[int]] = {}
    for r, rows in enumerate(everyone):
        holders.setdefault(tuple(rows[i]) if i < len(rows) else end, []).append(ranks[r])
    what = "; ".join(
        f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))} {'have' if len(rs) > 1 else 'has'} {kind} {val!r}"
        for (kind, val), rs in holders.items()
    )
    # where the structures part: the last block every rank agrees on
    block = next((r[1] for r in reversed(everyone[0][:i]) if r[0] == "block"), None)
    after = f" (after block {block!r})" if block is not None else ""
    return (
        f"zerocomm.attach: ranks disagree on the model/plan at entry {i}{after}: {what}; "
        "every rank must build the same model and call attach with the same arguments"
    )


def device_placement(device: torch.device | None) -> tuple[str, int] | None:
    """(host name, CUDA device index) of this rank's model; None off CUDA."""
    if device is None or device.type != "cuda":
        return None
    return socket.gethostname(), device.index if device.index is not None else torch.cuda.current_device()


def describe_shared_devices(placements: list[tuple[str, int] | None], ranks: list[int]) -> str | None:
    """None unless two ranks of one host put their model on the same CUDA
    device (NCCL cannot build a communicator then; typically torch.cuda.set_device
    was never called, so every rank landed on cuda:0)."""
    seen: dict[tuple[str, int], int] = {}
    for rank, where in zip(ranks, placements):
        if where is None:
            continue
        if where in seen:
            return (
                f"zerocomm.attach: ranks {seen[where]} and {rank} both use cuda:{where[1]} on host "
                f"{where[0]!r}; every rank needs its own GPU: call "
                "torch.cuda.set_device(int(os.environ['LOCAL_RANK'])) before building the model"
            )
        seen[where] = rank
    return None


def check_plan_consistent(
    mine: list[tuple] | None,
    error: BaseException | None,
    *,
    group: dist.ProcessGroup,
    device: torch.device | None = None,
    layout: LayoutFacts | None = None,
) -> None:
    """Exchange each rank's verdict over `group` (the one collective of
    attach) so that ranks fail together instead of some hanging in a later
    collective: a rank whose own checks failed (`error`) raises that error,
    and every other rank raises one naming it. Otherwise the plan
    fingerprints are compared; on mismatch EVERY rank raises the same error
    (each sees all fingerprints), naming the first differing block or
    parameter and the ranks involved. `device` (the model's) joins the
    exchange: two ranks of one host on the same CUDA device also fail.
    `layout` (this rank's groups) joins it too: groups that differ between
    ranks fail on every rank, naming one that disagrees (layout.describe_bad_tiling)."""
    world = dist.get_world_size(group)
    if world == 1:
        if error is not None:
            raise error
        return
    verdict = (
        None if error is None else f"{type(error).__name__}: {error}",
        mine,
        device_placement(device),
        layout,
    )
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, verdict, group=group)
    if error is not None:
        raise error
    ranks = dist.get_process_group_ranks(group)
    failed = [(ranks[r], v[0]) for r, v in enumerate(everyone) if v[0] is not None]
    if failed:
        who = ", ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise ValueError(f"zerocomm.attach failed on another rank, so no rank proceeds ({who})")
    msg = describe_bad_tiling([v[3] for v in everyone], ranks)
    if msg is None:
        msg = describe_mismatch([v[1] for v in everyone], ranks)
    if msg is None:
        msg = describe_shared_devices([v[2] for v in everyone], ranks)
    if msg is not None:
        raise ValueError(msg)
