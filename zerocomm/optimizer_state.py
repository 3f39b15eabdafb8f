"""Optimizer state in the unsharded optimizer's own format, assembled from
(or split into) every rank's shard."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .shards import ShardedOptimizer


def local_positions(zopt: ShardedOptimizer) -> dict[int, int]:
    """id(local tensor) -> its index in the local optimizer's state_dict."""
    pos, k = {}, 0
    for g in zopt.optim.param_groups:
        for t in g["params"]:
            pos[id(t)] = k
            k += 1
    return pos


def _receives(zopt: ShardedOptimizer, to_rank: int | None) -> bool:
    """Does this rank get the consolidated state_dict? `to_rank` counts in
    the data-parallel group -- every rank of the dense layout, the shard
    groups and their replicas ([Note: hierarchical layout]) -- as
    ZeroRedundancyOptimizer counts `to` in its process group. Checked on
    every rank before any collective."""
    if to_rank is None:
        return True
    layout = zopt.layouts.get(zopt.sharded_plans[0].name)
    group = layout.group if layout is not None else zopt.group
    rank, size = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    if not 0 <= to_rank < size:
        raise ValueError(
            f"state_dict(to_rank={to_rank}): to_rank is a rank of the data-parallel group "
            f"(0 .. {size - 1}: every rank zerocomm averages gradients over)"
        )
    return rank == to_rank


def consolidated_state_dict(zopt: ShardedOptimizer, to_rank: int | None = None) -> dict:
    """The state_dict the unsharded optimizer would have (loadable by a plain
    torch optimizer over the model's parameters). Collective over the group;
    with `to_rank`, only that rank gets it (others get {})."""
    receives = _receives(zopt, to_rank)
    zopt.synchronize()
    plan_of = {i: k for k, plan in enumerate(zopt.sharded_plans) for i in plan.params}
    mine: list[list[Any]] = [[] for _ in zopt.sharded_plans]
    for lp in zopt.pieces:
        st = zopt.optim.state.get(lp.tensor)
        if not st:
            continue
        entry = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
        mine[plan_of[lp.index]].append((lp.index, lp.start, lp.numel, entry))
    # Each plan's pieces come from the ranks of its own group: ranks of
    # other expert groups hold other experts under the same names.
    everyone: list[Any] = []
    for plan, pieces in zip(zopt.sharded_plans, mine):
        if plan.world_size > 1:
            gathered: list[Any] = [None] * plan.world_size
            dist.all_gather_object(gathered, pieces, group=plan.group)
            everyone += gathered
        else:
            everyone.append(pieces)
    if not receives:
        return {}
    state: dict[int, dict[str, Any]] = {}
    for rank_pieces in everyone:
        for idx, start, numel, entry in rank_pieces:
            p = zopt.user_params[idx]
            full = state.setdefault(idx, {})
            for k, v in entry.items():
                # per-element state of a piece (a whole parameter is the piece [0, numel))
                if torch.is_tensor(v) and v.dim() > 0 and v.numel() == numel and numel < p.numel():
                    buf = full.get(k)
                    if buf is None:
                        buf = full[k] = torch.zeros(p.numel(), dtype=v.dtype)
                    buf.view(-1)[start : start + numel] = v.view(-1)
                else:
                    full.setdefault(k, v)
    for idx, full in state.items():
        shape = zopt.user_params[idx].shape
        for k, v in full.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.numel() == zopt.user_params[idx].numel():
                full[k] = v.view(shape)
    groups, offset = [], 0
    for gi, size in enumerate(zopt.user_group_sizes):
        hyper = {k: v for k, v in zopt.optim.param_groups[gi].items() if k != "params"}
        groups.append({**hyper, "params": list(range(offset, offset + size))})
        offset += size
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_consolidated_state_dict(zopt: ShardedOptimizer, sd: dict) -> None:
    """Load a consolidated (unsharded-format) state_dict: each rank keeps the
    slices it owns. Every rank must pass the same dict."""
    if len(sd["param_groups"]) != len(zopt.user_group_sizes):
        raise ValueError(
            f"state_dict has {len(sd['param_groups'])} param groups but the optimizer has {len(zopt.user_group_sizes)}"
        )
    pos = local_positions(zopt)
    local_state: dict[int, dict[str, Any]] = {}
    for lp in zopt.pieces:
        full = sd["state"].get(lp.index)
        if full is None:
            continue
        p = zopt.user_params[lp.index]
        entry = {}
        for k, v in full.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.numel() == p.numel():
                v = v.reshape(-1)[lp.start : lp.start + lp.numel].view(lp.tensor.shape).clone()
            entry[k] = v
        local_state[pos[id(lp.tensor)]] = entry
    groups = []
    for gi, g in enumerate(zopt.optim.param_groups):
        hyper = {k: v for k, v in sd["param_groups"][gi].items() if k != "params"}
        groups.append({**hyper, "params": [pos[id(t)] for t in g["params"]]})
    zopt.optim.load_state_dict({"state": local_state, "param_groups": groups})
    zopt.refresh_masters()
