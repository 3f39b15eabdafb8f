"""What a zerocomm checkpoint holds: this rank's state dict for
`torch.distributed.checkpoint` (DCP), and applying a loaded one (see
`zerocomm.checkpoint` for save / load / consolidate). Tensors go through
DCP under global, world-size-independent names, so a checkpoint written by N
ranks in one mode loads on M ranks in either mode:

    model.<state_dict key>         full tensors (replicated: DCP writes each once)
    optim.state.<param>.<key>      element-wise state: a 1-D tensor of the param's
                                   numel, each rank writing only the piece it owns;
                                   scalars (Adam's `step`) and non-element-wise
                                   state (broadcast mode) as plain tensors
    optim.master.<param>           fp32 master pieces (only with master_dtype)

With expert sub-groups the expert groups' own entries carry the prefix
`experts.<g>.` (`_ckpt_keys`, [Note: checkpoint keys]).

zerocomm's own entries (meta: format, mode, world size, optimizer class,
param names per group; the param groups' hyper-parameters; `step`; `extra`)
are plain data in `zerocomm.pt`, read back with `torch.load(weights_only=True)`.

A rank's piece is a plain tensor carrying DCP's `CheckpointableTensor` fields
(global shape and offset), so DCP itself records the chunks at save and reads,
at load, exactly the overlap of the saved chunks with the new owner's piece.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from ._ckpt_compat import add_legacy_chunk_hooks
from ._ckpt_keys import (
    MASTER,
    MODEL,
    STATE,
    Keys,
    check_groups,
    checkpoint_group,
    model_entries,
    own_view,
    report,
    resolve,
    saved_groups,
    view,
)
from .optimizer_state import local_positions

if TYPE_CHECKING:
    from .shards import ShardedOptimizer

FORMAT = 1  # of the meta entry; the directory's format is _ckpt_fs.FORMAT
META, STEP, EXTRA = "zerocomm.meta", "zerocomm.step", "zerocomm.extra"
GROUPS = "optim.param_groups"


# ------------------------------------------------------------------ helpers


def _piece(t: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """`t` (1-D, this rank's elements [start, start + numel) of a tensor of
    `total` elements) tagged so DCP treats it as one chunk of that tensor."""
    for attr, value in (
        ("global_shape", (total,)),
        ("global_offsets", ((start,),)),
        ("local_offsets", ((0,),)),
        ("local_sizes", ((t.numel(),),)),
    ):
        setattr(t, attr, value)  # what DCP reads off a tensor that is one chunk of a larger one
    add_legacy_chunk_hooks(t, start, total)  # the same for torch 2.11's DCP
    return t


def _param_names(zopt: "ShardedOptimizer") -> list[str]:
    """Global name of every parameter of the user's optimizer, in its order."""
    return list(zopt.param_names)


def _group_names(zopt: "ShardedOptimizer") -> list[list[str]]:
    names, out, k = _param_names(zopt), [], 0
    for size in zopt.user_group_sizes:
        out.append(names[k : k + size])
        k += size
    return out


def dcp_group(zopt: "ShardedOptimizer") -> dist.ProcessGroup | None:
    """The group DCP coordinates over (every rank holding part of the
    model: the shard groups and their replicas); None without
    torch.distributed."""
    if not dist.is_initialized():
        return None
    return checkpoint_group(zopt)


def keys_over_group(zopt: "ShardedOptimizer", *, compare_unplanned: bool) -> Keys:
    """This rank's checkpoint keys, shared over the data-parallel group
    itself (one all_gather_object, only with an expert plan). `save` and
    `load` share them over their own gloo group instead."""
    mine = report(zopt, compare_unplanned=compare_unplanned)
    group = dcp_group(zopt)
    if mine is None or group is None:
        return Keys()
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return resolve(zopt, everyone)


def _is_elementwise(key: str, v: Any, local: torch.Tensor) -> bool:
    """State with one value per element of the local tensor (exp_avg,
    momentum_buffer, ...), as opposed to scalars (`step`) and whole-tensor
    state of non-element-wise optimizers. A 0-dim parameter's state is
    ambiguous by shape: there only `step` counts as a scalar."""
    if not torch.is_tensor(v) or v.numel() != local.numel():
        return False
    return v.dim() > 0 or (local.dim() == 0 and key != "step")


def by_param(entries: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{param name: {state key: value}} of every `optim.state.<name>.<key>`
    entry (torch optimizers' state keys contain no dots)."""
    out: dict[str, dict[str, Any]] = {}
    for key, v in entries.items():
        if key.startswith(STATE):
            name, _, k = key[len(STATE) :].rpartition(".")
            out.setdefault(name, {})[k] = v
    return out


def _empty_like_md(md: Any, device: torch.device, numel: int | None = None) -> Any:
    if isinstance(md, BytesStorageMetadata):
        return None  # DCP replaces it with the loaded object
    return torch.empty(md.size if numel is None else (numel,), dtype=md.properties.dtype, device=device)


# ------------------------------------------------------- state dict (DCP)


def sharded_state_dict(
    zopt: "ShardedOptimizer", *, metadata: Metadata | None = None, keys: Keys | None = None
) -> dict[str, Any]:
    """This rank's part of the checkpoint, for `dcp.save` / `dcp.load`.

    Without `metadata`: the current model and optimizer state (to save, or to
    load into an optimizer that has the same state keys). With a checkpoint's
    `metadata` (`FileSystemReader(path).read_metadata()`): freshly allocated
    tensors shaped after that checkpoint for this rank's ownership (to load
    into an optimizer that has not stepped yet). Load the result with
    `load_sharded_state_dict`, which checks everything before it writes
    anything (model tensors are scratch copies when loading). With expert
    sub-groups (`expert_group`) this is a collective over the data-parallel
    group: the ranks share their expert groups (`keys`: already shared).
    """
    if keys is None:
        keys = keys_over_group(zopt, compare_unplanned=metadata is None)
    if metadata is not None:
        check_groups(keys, saved_groups(metadata.state_dict_metadata))
        keys = keys.for_checkpoint(metadata.state_dict_metadata)
    zopt.synchronize()  # parameters are read (or written) outside a forward pass
    names = _param_names(zopt)
    sd: dict[str, Any] = {}
    for k, v in model_entries(zopt).items():
        # Loading goes into scratch tensors (on the CPU, not doubling GPU
        # memory): a load that fails half-way must leave the model as it was.
        sd[keys.key(k, MODEL + k)] = v if metadata is None else torch.empty_like(v, device="cpu")
    if metadata is None:
        sd[META] = {
            "format": FORMAT,
            "mode": zopt.mode,
            "world_size": zopt.world_size,
            "optimizer": type(zopt.optim).__name__,
            "param_names": _group_names(zopt),
            "n_chunks": len(zopt.chunks),
            "layout": {name: lay.describe() for name, lay in zopt.layouts.items()},  # at save
            "expert_groups": [list(g) for g in keys.groups],  # global ranks of each, at save
        }
        sd[GROUPS] = [{k: v for k, v in g.items() if k != "params"} for g in zopt.optim.param_groups]
    else:
        for key in (META, GROUPS, STEP, EXTRA):
            if key in metadata.state_dict_metadata:
                sd[key] = None
    saved = by_param(view(metadata.state_dict_metadata, keys.index)) if metadata is not None else {}
    for lp in zopt.pieces:
        name, p = names[lp.index], zopt.user_params[lp.index]
        if metadata is None:
            for k, v in zopt.optim.state.get(lp.tensor, {}).items():
                key = keys.key(name, f"{STATE}{name}.{k}")
                if _is_elementwise(k, v, lp.tensor):
                    sd[key] = _piece(v.detach().reshape(-1), lp.start, p.numel())
                else:
                    sd[key] = v  # scalar (replicated) or whole-parameter state
            if lp.tensor.dtype != p.dtype:
                sd[keys.key(name, MASTER + name)] = _piece(lp.tensor.detach().reshape(-1), lp.start, p.numel())
            continue
        for k, md in saved.get(name, {}).items():
            key = keys.key(name, f"{STATE}{name}.{k}")
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
        master_key = keys.key(name, MASTER + name)
        md = metadata.state_dict_metadata.get(master_key)
        if md is not None and lp.tensor.dtype != p.dtype:
            sd[master_key] = _piece(_empty_like_md(md, lp.tensor.device, lp.numel), lp.start, p.numel())
    return sd


def _names_diff(got: list[str], want: list[str]) -> str | None:
    """What differs between the checkpoint's names (`got`) and the model's."""
    have, need = set(got), set(want)
    lacking = [n for n in want if n not in have]
    surplus = [n for n in got if n not in need]
    if not lacking and not surplus:
        return None
    parts = []
    if surplus:
        parts.append(
            f"the checkpoint has {len(surplus)} entries the model lacks: {surplus[:5]}"
            + (" ..." if len(surplus) > 5 else "")
        )
    if lacking:
        parts.append(
            f"the model has {len(lacking)} entries the checkpoint lacks: {lacking[:5]}"
            + (" ..." if len(lacking) > 5 else "")
        )
    return "; ".join(parts) + " (a different model architecture or number of layers?)"


def check_compatible(
    zopt: "ShardedOptimizer", meta: Any, groups: Any, metadata: Metadata | None = None, keys: Keys | None = None
) -> None:
    """Every mismatch between a checkpoint and this model/optimizer, named,
    before anything is read into or written to them (`keys`: this rank's,
    to check the expert groups against `metadata`)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a zerocomm checkpoint (format {FORMAT}): {META} is {meta!r}")
    saved, mine = meta.get("optimizer"), type(zopt.optim).__name__
    if saved != mine:
        raise ValueError(
            f"the checkpoint holds {saved} optimizer state but this optimizer is {mine}: "
            f"load it into the same optimizer class ({saved}); consolidate() gives the "
            "model weights alone"
        )
    live = model_entries(zopt)
    if metadata is not None:  # names, shapes and dtypes of the model's tensors
        keys = keys or Keys()
        check_groups(keys, saved_groups(metadata.state_dict_metadata))
        entries = view(metadata.state_dict_metadata, keys.index)
        md = {k[len(MODEL) :]: v for k, v in entries.items() if k.startswith(MODEL)}
        diff = _names_diff(list(md), list(live))
        if diff is not None:
            raise ValueError(f"model parameters/buffers do not match the checkpoint: {diff}")
        for name, t in live.items():
            m = md[name]
            if not isinstance(m, TensorStorageMetadata):
                raise ValueError(f"{name!r} is not a tensor in the checkpoint")
            if tuple(m.size) != tuple(t.shape):
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(m.size)} in the checkpoint but {tuple(t.shape)} in the model"
                )
            if m.properties.dtype != t.dtype:
                raise ValueError(
                    f"parameter {name!r} is {m.properties.dtype} in the checkpoint but {t.dtype} "
                    "in the model: convert the model (model.to(dtype)) before loading"
                )
    got, want = meta.get("param_names") or [], _group_names(zopt)
    if got != want:
        flat_got = [n for g in got for n in g] if isinstance(got, list) else []
        diff = _names_diff(flat_got, [n for g in want for n in g])
        if diff is not None:
            raise ValueError(f"the optimizer's parameters do not match the checkpoint: {diff}")
        if len(got) != len(want):
            raise ValueError(f"checkpoint has {len(got)} param groups but the optimizer has {len(want)}")
        for gi, (a, b) in enumerate(zip(got, want)):
            if a != b:
                first = next((f"{x!r} vs {y!r}" for x, y in zip(a, b) if x != y), f"{len(a)} vs {len(b)}")
                raise ValueError(
                    f"param group {gi} holds other parameters than in the checkpoint "
                    f"(checkpoint vs optimizer: {first}): build the same param groups"
                )
    if not isinstance(groups, list) or len(groups) != len(zopt.optim.param_groups):
        raise ValueError(
            f"checkpoint has {len(groups) if isinstance(groups, list) else groups!r} param "
            f"groups but the optimizer has {len(zopt.optim.param_groups)}"
        )


@torch.no_grad()
def load_sharded_state_dict(zopt: "ShardedOptimizer", state_dict: dict[str, Any]) -> None:
    """Apply what `dcp.load` filled into `sharded_state_dict(...)`: model
    parameters and buffers, this rank's optimizer state and masters, and the
    param groups' hyper-parameters. No collective; every rank leaves with
    identical parameters, so no sync needs to be launched. Everything is
    checked before anything is written: a refused load changes nothing."""
    state_dict = own_view(state_dict)  # this rank's expert group's entries, unprefixed
    check_compatible(zopt, state_dict.get(META), state_dict.get(GROUPS))
    zopt.synchronize()
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, dst in model_entries(zopt).items():
        src = state_dict.get(MODEL + name)
        if not torch.is_tensor(src) or src.shape != dst.shape or src.dtype != dst.dtype:
            what = "missing" if not torch.is_tensor(src) else f"{tuple(src.shape)} {src.dtype}"
            raise ValueError(
                f"model entry {name!r} of the loaded state is {what}, the model's is {tuple(dst.shape)} {dst.dtype}"
            )
        copies.append((dst, src))
    names = _param_names(zopt)
    pos = local_positions(zopt)
    local_state: dict[int, dict[str, Any]] = {}
    masters: list[tuple[Any, torch.Tensor | None]] = []
    state = by_param(state_dict)
    for lp in zopt.pieces:
        name, p = names[lp.index], zopt.user_params[lp.index]
        if lp.tensor.dtype != p.dtype:  # a separate master: prefer the saved fp32 values
            master = state_dict.get(MASTER + name)
            if master is not None and master.numel() != lp.numel:
                raise ValueError(f"master of {name!r}: {master.numel()} elements loaded, {lp.numel} owned")
            masters.append((lp, master))
        # a piece goes back to the local tensor's shape
        entry = {
            k: v.view(lp.tensor.shape) if hasattr(v, "global_shape") else v for k, v in state.get(name, {}).items()
        }
        if entry:
            local_state[pos[id(lp.tensor)]] = entry
    # Commit. The optimizer first: torch checks its state dict and may still
    # refuse it; the tensor copies below cannot fail any more.
    zopt.optim.load_state_dict(
        {
            "state": local_state,
            "param_groups": [
                {**hyper, "params": [pos[id(t)] for t in g["params"]]}
                for hyper, g in zip(state_dict[GROUPS], zopt.optim.param_groups)
            ],
        }
    )
    for dst, src in copies:
        if src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
    # In allgather mode this rank's slice of the flat sync buffer IS its
    # master shard: take the loaded parameters up (saved fp32 masters below
    # then replace the separate ones).
    zopt.refresh_masters()
    for lp, master in masters:
        if master is None:
            master = zopt.user_params[lp.index].detach().reshape(-1).narrow(0, lp.start, lp.numel)
        lp.tensor.detach().reshape(-1).copy_(master)
