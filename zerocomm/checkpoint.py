"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP).

Every key is a global, world-size-independent name, so a checkpoint written
by N ranks in one mode loads on M ranks in either mode:

    zerocomm.meta                  format, mode, world size, param names per group
    zerocomm.step, zerocomm.extra  what `save()` was given
    model.<state_dict key>         full tensors (replicated: DCP writes each once)
    optim.param_groups             hyper-parameters per group (lr after a scheduler, ...)
    optim.state.<param>.<key>      element-wise state: a 1-D tensor of the param's
                                   numel, each rank writing only the piece it owns;
                                   scalars (Adam's `step`) and non-element-wise
                                   state (broadcast mode) as plain tensors
    optim.master.<param>           fp32 master pieces (only with master_dtype)

A rank's piece is a plain tensor carrying DCP's `CheckpointableTensor` fields
(global shape and offset), so DCP itself records the chunks at save and reads,
at load, exactly the overlap of the saved chunks with the new owner's piece.
"""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from .optimizer_state import _local_positions, refresh_masters

if TYPE_CHECKING:
    from .optimizer import ZeroOptimizer

FORMAT = 1
META, STEP, EXTRA = "zerocomm.meta", "zerocomm.step", "zerocomm.extra"
GROUPS = "optim.param_groups"
STATE, MASTER, MODEL = "optim.state.", "optim.master.", "model."
TMP_SUFFIX, OLD_SUFFIX = ".saving", ".old"


class Loaded(NamedTuple):
    """What `load()` returns besides restoring the model and optimizer."""

    step: Any
    extra: Any


# ------------------------------------------------------------------ helpers


def _piece(t: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """`t` (1-D, this rank's elements [start, start + numel) of a tensor of
    `total` elements) tagged so DCP treats it as one chunk of that tensor."""
    t.global_shape = (total,)
    t.global_offsets = ((start,),)
    t.local_offsets = ((0,),)
    t.local_sizes = ((t.numel(),),)
    return t


def _chunks(zopt: "ZeroOptimizer") -> list[torch.nn.Module]:
    return list(zopt.sync.chunks)


def _prefix(zopt: "ZeroOptimizer", c: int) -> str:
    return f"chunk{c}." if len(_chunks(zopt)) > 1 else ""


def _param_names(zopt: "ZeroOptimizer") -> list[str]:
    """Global name of every parameter of the user's optimizer, in its order."""
    names: dict[int, str] = {}
    for c, chunk in enumerate(_chunks(zopt)):
        for n, p in chunk.named_parameters():
            names.setdefault(id(p), _prefix(zopt, c) + n)
    return [names[id(p)] for p in zopt._user_params]


def _group_names(zopt: "ZeroOptimizer") -> list[list[str]]:
    names, out, k = _param_names(zopt), [], 0
    for g in zopt._user_optimizer.param_groups:
        out.append(names[k:k + len(g["params"])])
        k += len(g["params"])
    return out


def _group(zopt: "ZeroOptimizer") -> dist.ProcessGroup | None:
    """The group DCP coordinates over; None without torch.distributed."""
    if not dist.is_initialized():
        return None
    group = zopt.units[0].group
    members = dist.get_process_group_ranks(group)
    for u in zopt.units[1:]:
        if dist.get_process_group_ranks(u.group) != members:
            # Expert parameters synced over sub-groups hold different values
            # per sub-group: one global key per parameter cannot describe them.
            raise NotImplementedError(
                f"checkpointing the {u.name!r} plan is not supported: it syncs over a sub-group "
                "of the data-parallel group (expert_group); use the same group for all plans"
            )
    return group


def _barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.barrier(group=group)


def _is_elementwise(key: str, v: Any, local: torch.Tensor) -> bool:
    """State with one value per element of the local tensor (exp_avg,
    momentum_buffer, ...), as opposed to scalars (`step`) and whole-tensor
    state of non-element-wise optimizers. A 0-dim parameter's state is
    ambiguous by shape: there only `step` counts as a scalar."""
    if not torch.is_tensor(v) or v.numel() != local.numel():
        return False
    return v.dim() > 0 or (local.dim() == 0 and key != "step")


def _by_param(entries: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{param name: {state key: value}} of every `optim.state.<name>.<key>`
    entry (torch optimizers' state keys contain no dots)."""
    out: dict[str, dict[str, Any]] = {}
    for key, v in entries.items():
        if key.startswith(STATE):
            name, _, k = key[len(STATE):].rpartition(".")
            out.setdefault(name, {})[k] = v
    return out


def _empty_like_md(md: Any, device: torch.device, numel: int | None = None) -> Any:
    if isinstance(md, BytesStorageMetadata):
        return None  # DCP replaces it with the loaded object
    return torch.empty(md.size if numel is None else (numel,), dtype=md.properties.dtype, device=device)


# ------------------------------------------------------- state dict (DCP)


def sharded_state_dict(zopt: "ZeroOptimizer", *, metadata: Metadata | None = None) -> dict[str, Any]:
    """This rank's part of the checkpoint, for `dcp.save` / `dcp.load`.

    Without `metadata`: the current model and optimizer state (to save, or to
    load into an optimizer that has the same state keys). With a checkpoint's
    `metadata` (`FileSystemReader(path).read_metadata()`): freshly allocated
    tensors shaped after that checkpoint for this rank's ownership (to load
    into an optimizer that has not stepped yet). Load the result with
    `load_sharded_state_dict`. Model tensors are the live parameters, so
    `dcp.load` writes them in place.
    """
    _group(zopt)  # refuse unsupported expert sub-groups up front
    zopt.synchronize()  # parameters are read (or written) outside a forward pass
    names = _param_names(zopt)
    sd: dict[str, Any] = {}
    for c, chunk in enumerate(_chunks(zopt)):
        for k, v in chunk.state_dict(keep_vars=False).items():
            sd[MODEL + _prefix(zopt, c) + k] = v
    if metadata is None:
        sd[META] = {
            "format": FORMAT,
            "mode": zopt.mode,
            "world_size": zopt.units[0].transport.world_size,
            "optimizer": type(zopt.optim).__name__,
            "param_names": _group_names(zopt),
            "n_chunks": len(_chunks(zopt)),
        }
        sd[GROUPS] = [{k: v for k, v in g.items() if k != "params"} for g in zopt.optim.param_groups]
    else:
        for key in (META, GROUPS, STEP, EXTRA):
            if key in metadata.state_dict_metadata:
                sd[key] = None
    saved = _by_param(metadata.state_dict_metadata) if metadata is not None else {}
    for lp in zopt._locals:
        name, p = names[lp.index], zopt._user_params[lp.index]
        if metadata is None:
            for k, v in zopt.optim.state.get(lp.tensor, {}).items():
                if _is_elementwise(k, v, lp.tensor):
                    sd[f"{STATE}{name}.{k}"] = _piece(v.detach().reshape(-1), lp.start, p.numel())
                else:
                    sd[f"{STATE}{name}.{k}"] = v  # scalar (replicated) or whole-parameter state
            if lp.tensor.dtype != p.dtype:
                sd[MASTER + name] = _piece(lp.tensor.detach().reshape(-1), lp.start, p.numel())
            continue
        for k, md in saved.get(name, {}).items():
            key = f"{STATE}{name}.{k}"
            if isinstance(md, TensorStorageMetadata) and tuple(md.size) == (p.numel(),):
                sd[key] = _piece(_empty_like_md(md, lp.tensor.device, lp.numel), lp.start, p.numel())
            elif lp.numel != p.numel() and isinstance(md, TensorStorageMetadata) and len(md.size) > 0:
                raise ValueError(
                    f"optimizer state {k!r} of {name} is not element-wise (shape {tuple(md.size)}), "
                    "so it cannot be split into the slices this rank owns in allgather mode: "
                    "load it with mode='broadcast'"
                )
            else:
                sd[key] = _empty_like_md(md, lp.tensor.device)
        md = metadata.state_dict_metadata.get(MASTER + name)
        if md is not None and lp.tensor.dtype != p.dtype:
            sd[MASTER + name] = _piece(_empty_like_md(md, lp.tensor.device, lp.numel), lp.start, p.numel())
    return sd


@torch.no_grad()
def load_sharded_state_dict(zopt: "ZeroOptimizer", state_dict: dict[str, Any]) -> None:
    """Apply what `dcp.load` filled into `sharded_state_dict(...)`: model
    parameters and buffers, this rank's optimizer state and masters, and the
    param groups' hyper-parameters. No collective; every rank leaves with
    identical parameters, so no sync needs to be launched."""
    meta = state_dict.get(META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a zerocomm checkpoint (format {FORMAT}): {META} is {meta!r}")
    want = _group_names(zopt)
    if meta["param_names"] != want:
        got = meta["param_names"]
        if len(got) != len(want):
            raise ValueError(f"checkpoint has {len(got)} param groups but the optimizer has {len(want)}")
        for gi, (a, b) in enumerate(zip(got, want)):
            if a != b:
                diff = next((f"{x!r} vs {y!r}" for x, y in zip(a, b) if x != y), f"{len(a)} vs {len(b)} params")
                raise ValueError(f"param group {gi} differs from the checkpoint's: {diff}")
    zopt.synchronize()
    for c, chunk in enumerate(_chunks(zopt)):
        for k, dst in chunk.state_dict(keep_vars=False).items():
            src = state_dict[MODEL + _prefix(zopt, c) + k]
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
    # In allgather mode this rank's slice of the flat sync buffer IS its
    # master shard: take the loaded parameters up (saved fp32 masters below
    # then replace the separate ones).
    refresh_masters(zopt)
    names = _param_names(zopt)
    pos = _local_positions(zopt)
    local_state: dict[int, dict[str, Any]] = {}
    state = _by_param(state_dict)
    for lp in zopt._locals:
        name, p = names[lp.index], zopt._user_params[lp.index]
        if lp.tensor.dtype != p.dtype:  # a separate master: prefer the saved fp32 values
            master = state_dict.get(MASTER + name)
            src = master if master is not None else p.detach().reshape(-1).narrow(0, lp.start, lp.numel)
            lp.tensor.detach().reshape(-1).copy_(src)
        # a piece goes back to the local tensor's shape
        entry = {k: v.view(lp.tensor.shape) if hasattr(v, "global_shape") else v
                 for k, v in state.get(name, {}).items()}
        if entry:
            local_state[pos[id(lp.tensor)]] = entry
    groups = state_dict[GROUPS]
    if len(groups) != len(zopt.optim.param_groups):
        raise ValueError(f"checkpoint has {len(groups)} param groups but the optimizer has "
                         f"{len(zopt.optim.param_groups)}")
    zopt.optim.load_state_dict({
        "state": local_state,
        "param_groups": [{**hyper, "params": [pos[id(t)] for t in g["params"]]}
                         for hyper, g in zip(groups, zopt.optim.param_groups)],
    })


# ---------------------------------------------------- save / load / consolidate


def _resolve(path: str) -> str:
    """The complete checkpoint at `path`: a crash between the two renames of
    `save` leaves it only under `<path>.old`."""
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    old = path + OLD_SUFFIX
    if not os.path.exists(path) and os.path.exists(os.path.join(old, ".metadata")):
        return old
    raise FileNotFoundError(f"no complete zerocomm checkpoint at {path}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: str, path: str) -> None:
    """Put the finished `tmp` at `path`; until the second rename the previous
    checkpoint stays complete under `<path>.old` (found by `_resolve`)."""
    old = path + OLD_SUFFIX
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def save(path: str | os.PathLike, zopt: "ZeroOptimizer", *, step: Any = None, extra: Any = None) -> None:
    """Write a sharded checkpoint of the model and optimizer to directory
    `path` (collective: every rank calls it; `path` on a shared filesystem).

    Everything is written to `<path>.saving` first and moved into place by
    rank 0 only after every rank finished, so a crash mid-save leaves the
    previous checkpoint intact. `step` and `extra` (any picklable object,
    e.g. an LR scheduler's state_dict) come back from `load()`."""
    path = os.fspath(path)
    group = _group(zopt)
    rank = dist.get_rank(group) if group is not None else 0
    tmp = path + TMP_SUFFIX
    sd = sharded_state_dict(zopt)
    sd[STEP], sd[EXTRA] = step, extra
    if rank == 0:
        old = path + OLD_SUFFIX
        if not os.path.exists(path) and os.path.exists(old):
            os.rename(old, path)  # finish what a crash between the renames left
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _barrier(group)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp), process_group=group,
             planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=group is None)
    _barrier(group)  # every rank's files are complete before the rename
    if rank == 0:
        _replace(tmp, path)
    _barrier(group)  # nobody reads `path` before it is the new checkpoint


def load(path: str | os.PathLike, zopt: "ZeroOptimizer") -> Loaded:
    """Restore model parameters, optimizer state and hyper-parameters from a
    checkpoint written by `save()` on any world size and in either mode
    (collective). Returns `(step, extra)` as given to `save()`."""
    path = _resolve(os.fspath(path))
    group = _group(zopt)
    metadata = dcp.FileSystemReader(path).read_metadata()
    sd = sharded_state_dict(zopt, metadata=metadata)
    # No flattening: DCP would then write loaded objects into its own copy of `sd`.
    dcp.load(sd, storage_reader=dcp.FileSystemReader(path), process_group=group,
             planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=group is None)
    load_sharded_state_dict(zopt, sd)
    _barrier(group)
    return Loaded(sd.get(STEP), sd.get(EXTRA))


def consolidate(path: str | os.PathLike, out_file: str | os.PathLike) -> dict[str, Any]:
    """Turn the sharded checkpoint at `path` into one `torch.save` file (one
    process, no process group needed):

        {"model": model state_dict (a list of them for several chunks),
         "optimizer": state_dict in the unsharded torch optimizer's format,
         "step": ..., "extra": ..., "master": {param name: fp32 master} if any}

    Returns the same dict."""
    sd: dict[str, Any] = {}
    # What dcp_to_torch_save does: the planner builds every key from the
    # metadata, assembling each tensor from all saved chunks (dcp.load would
    # only fill the keys `sd` already has).
    _load_state_dict(sd, storage_reader=dcp.FileSystemReader(_resolve(os.fspath(path))),
                     planner=_EmptyStateDictLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                     no_dist=True)
    meta = sd.get(META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a zerocomm checkpoint (format {FORMAT})")
    model = {k[len(MODEL):]: v for k, v in sd.items() if k.startswith(MODEL)}
    saved = _by_param(sd)
    state: dict[int, dict[str, Any]] = {}
    groups, idx = [], 0
    for hyper, names in zip(sd[GROUPS], meta["param_names"]):
        groups.append({**hyper, "params": list(range(idx, idx + len(names)))})
        for name in names:
            shape = model[name].shape  # element-wise state was saved flattened
            entry = {k: v.view(shape) if torch.is_tensor(v) and tuple(v.shape) == (shape.numel(),) else v
                     for k, v in saved.get(name, {}).items()}
            if entry:
                state[idx] = entry
            idx += 1
    n = meta.get("n_chunks", 1)
    if n > 1:
        model = [{k[len(f"chunk{c}."):]: v for k, v in model.items() if k.startswith(f"chunk{c}.")}
                 for c in range(n)]
    out: dict[str, Any] = {
        "model": model,
        "optimizer": {"state": state, "param_groups": groups},
        "step": sd.get(STEP),
        "extra": sd.get(EXTRA),
    }
    masters = {k[len(MASTER):]: v for k, v in sd.items() if k.startswith(MASTER)}
    if masters:
        out["master"] = masters
    torch.save(out, os.fspath(out_file))
    return out
