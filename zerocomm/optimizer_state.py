"""Optimizer state in the unsharded optimizer's own format, assembled from
(or split into) every rank's shard."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .optimizer import ZeroOptimizer


def _local_positions(zopt: "ZeroOptimizer") -> dict[int, int]:
    """id(local tensor) -> its index in the local optimizer's state_dict."""
    pos, k = {}, 0
    for g in zopt.optim.param_groups:
        for t in g["params"]:
            pos[id(t)] = k
            k += 1
    return pos


def consolidated_state_dict(zopt: "ZeroOptimizer", to_rank: int | None = None) -> dict:
    """The state_dict the unsharded optimizer would have (loadable by a plain
    torch optimizer over the model's parameters). Collective over the group;
    with `to_rank`, only that rank gets it (others get {})."""
    zopt.synchronize()
    pieces = []
    for lp in zopt._locals:
        st = zopt.optim.state.get(lp.tensor)
        if not st:
            continue
        entry = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
        pieces.append((lp.index, lp.start, lp.numel, entry))
    group = zopt.units[0].group
    world = dist.get_world_size(group) if zopt.units[0].transport.world_size > 1 else 1
    if world > 1:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, pieces, group=group)
    else:
        everyone = [pieces]
    if to_rank is not None and dist.get_rank(group) != to_rank:
        return {}
    state: dict[int, dict[str, Any]] = {}
    for rank_pieces in everyone:
        for idx, start, numel, entry in rank_pieces:
            p = zopt._user_params[idx]
            full = state.setdefault(idx, {})
            for k, v in entry.items():
                if torch.is_tensor(v) and v.dim() > 0 and zopt.mode == "allgather":
                    buf = full.get(k)
                    if buf is None:
                        buf = full[k] = torch.zeros(p.numel(), dtype=v.dtype)
                    buf.view(-1)[start:start + numel] = v.view(-1)
                else:
                    full.setdefault(k, v)
    for idx, full in state.items():
        shape = zopt._user_params[idx].shape
        for k, v in full.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.numel() == zopt._user_params[idx].numel():
                full[k] = v.view(shape)
    groups, offset = [], 0
    for gi, g in enumerate(zopt._user_optimizer.param_groups):
        hyper = {k: v for k, v in zopt.optim.param_groups[gi].items() if k != "params"}
        groups.append({**hyper, "params": list(range(offset, offset + len(g["params"])))})
        offset += len(g["params"])
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_consolidated_state_dict(zopt: "ZeroOptimizer", sd: dict) -> None:
    """Load a consolidated (unsharded-format) state_dict: each rank keeps the
    slices it owns. Every rank must pass the same dict."""
    if len(sd["param_groups"]) != len(zopt._user_optimizer.param_groups):
        raise ValueError(
            f"state_dict has {len(sd['param_groups'])} param groups but the optimizer has "
            f"{len(zopt._user_optimizer.param_groups)}"
        )
    pos = _local_positions(zopt)
    local_state: dict[int, dict[str, Any]] = {}
    for lp in zopt._locals:
        full = sd["state"].get(lp.index)
        if full is None:
            continue
        p = zopt._user_params[lp.index]
        entry = {}
        for k, v in full.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.numel() == p.numel():
                v = v.reshape(-1)[lp.start:lp.start + lp.numel].view(lp.tensor.shape).clone()
            entry[k] = v
        local_state[pos[id(lp.tensor)]] = entry
    groups = []
    for gi, g in enumerate(zopt.optim.param_groups):
        hyper = {k: v for k, v in sd["param_groups"][gi].items() if k != "params"}
        groups.append({**hyper, "params": [pos[id(t)] for t in g["params"]]})
    zopt.optim.load_state_dict({"state": local_state, "param_groups": groups})
    refresh_masters(zopt)


@torch.no_grad()
def refresh_masters(zopt: "ZeroOptimizer") -> None:
    """Take up working parameters written outside zerocomm since attach (the
    usual resume: model.load_state_dict(...), then the optimizer's). The
    step updates the masters (the flat shard itself in allgather mode, fp32
    copies under master_dtype) and the sync copies them over the parameters,
    so stale masters would silently undo the load. Elements whose working
    value still equals its master (rounded) keep the master's precision."""
    zopt.synchronize()
    for lp in zopt._locals:
        p = zopt._user_params[lp.index]
        if lp.tensor is p:  # broadcast mode, no master copy: the parameter itself
            continue
        working = p.detach().reshape(-1).narrow(0, lp.start, lp.numel)
        master = lp.tensor.detach().view(-1)
        changed = working != master.to(working.dtype)
        master[changed] = working[changed].to(master.dtype)
