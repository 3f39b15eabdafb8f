"""The data-parallel layout of one attach: flat (shard over every rank of
`group`) or hierarchical (shard inside `shard_group`, replicate across
`replicate_group`), as FSDP2's HSDP ([Note: hierarchical layout] in
docs/design.md).

`resolve_layout` checks what one rank can see by itself; `describe_bad_tiling`
checks what only all ranks together can see (groups that differ between
ranks), on the facts every rank sends in attach's one verdict exchange
(validate.check_plan_consistent), so a bad layout fails on every rank.
Collective-free: process groups are only inspected here, never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch.distributed as dist

MESH_DIMS = ("replicate", "shard")  # the DeviceMesh dim names attach(mesh=) reads


@dataclass(frozen=True)
class DPLayout:
    """Where a plan's state lives and which ranks hold the same shard."""

    shard_group: dist.ProcessGroup  # optimizer state, the param sync and the grad reduce-scatter live here
    replicate_group: dist.ProcessGroup | None  # ranks that hold the same shard (None: flat)
    shard_rank: int  # this rank in the shard group
    shard_size: int  # L
    replica_rank: int  # this rank among its replicas
    replica_size: int  # M (1 when flat)
    group: dist.ProcessGroup  # every rank of the layout (flat: the shard group; hierarchical: the world)

    @property
    def hierarchical(self) -> bool:
        return self.replicate_group is not None

    @property
    def data_parallel_size(self) -> int:
        """L * M: the ranks gradients are averaged over."""
        return self.shard_size * self.replica_size

    def facts(self) -> "LayoutFacts":
        """This rank's view of the layout, in global ranks (for the exchange)."""
        return LayoutFacts(
            tuple(dist.get_process_group_ranks(self.shard_group)),
            tuple(dist.get_process_group_ranks(self.replicate_group)) if self.replicate_group is not None else None,
        )

    def describe(self) -> str:
        if not self.hierarchical:
            return f"flat over {self.shard_size}"
        return f"{self.replica_size} replicas x shard groups of {self.shard_size}"


class LayoutFacts(NamedTuple):
    """One rank's groups in global ranks; `replicate` None when flat."""

    shard: tuple[int, ...]
    replicate: tuple[int, ...] | None


def flat_layout(group: dist.ProcessGroup) -> DPLayout:
    """Shard over every rank of `group` (zerocomm's layout before issue 21)."""
    return DPLayout(group, None, dist.get_rank(group), dist.get_world_size(group), 0, 1, group)


def exchange_group(
    group: dist.ProcessGroup | None, shard_group: dist.ProcessGroup | None, mesh: Any
) -> dist.ProcessGroup:
    """The group attach's verdict exchange runs over, known even when the
    layout is bad: the flat group, else the world (a hierarchical layout
    must tile it)."""
    if shard_group is None and mesh is None and group is not None:
        return group
    return cast(dist.ProcessGroup, dist.group.WORLD)


def resolve_layout(
    group: dist.ProcessGroup | None,
    shard_group: dist.ProcessGroup | None,
    replicate_group: dist.ProcessGroup | None,
    mesh: Any,
) -> DPLayout:
    """The layout attach's arguments ask for; raises on what this rank can
    see is wrong. `group` must be initialised (transport.resolve_group)."""
    hier = shard_group is not None or replicate_group is not None or mesh is not None
    if not hier:
        return flat_layout(group if group is not None else cast(dist.ProcessGroup, dist.group.WORLD))
    if group is not None:
        raise ValueError(
            "zerocomm.attach: pass either group= (flat ZeRO over one group) or shard_group=/replicate_group= "
            "or mesh= (hierarchical), not both"
        )
    if mesh is not None:
        if shard_group is not None or replicate_group is not None:
            raise ValueError("zerocomm.attach: pass either mesh= or shard_group=/replicate_group=, not both")
        shard_group, replicate_group = _mesh_groups(mesh)
    if shard_group is None:
        raise ValueError("zerocomm.attach: replicate_group= needs shard_group= (the ranks that share one copy)")
    if replicate_group is None:
        if dist.get_world_size(shard_group) == dist.get_world_size():
            return flat_layout(shard_group)
        raise ValueError(
            "zerocomm.attach: shard_group= without replicate_group=: pass replicate_group= as well (the ranks "
            "with the same index in their shard groups) or mesh= (a 2D DeviceMesh with dims "
            f"{MESH_DIMS}), so that every rank names the same layout"
        )
    me = dist.get_rank()
    s_ranks = dist.get_process_group_ranks(shard_group)
    r_ranks = dist.get_process_group_ranks(replicate_group)
    for what, ranks in (("shard_group", s_ranks), ("replicate_group", r_ranks)):
        if me not in ranks:
            raise ValueError(f"zerocomm.attach: rank {me} is not in its own {what} {ranks}")
    both = sorted(set(s_ranks) & set(r_ranks))
    if both != [me]:
        raise ValueError(
            f"zerocomm.attach: shard_group {s_ranks} and replicate_group {r_ranks} of rank {me} overlap in "
            f"ranks {both}; they may share only this rank (a rank holds one shard, and one replica of it)"
        )
    world = dist.get_world_size()
    if len(s_ranks) * len(r_ranks) != world:
        raise ValueError(
            f"zerocomm.attach: shard_group {s_ranks} x replicate_group {r_ranks} of rank {me} is "
            f"{len(s_ranks)} x {len(r_ranks)} = {len(s_ranks) * len(r_ranks)} ranks, which does not cover "
            f"the world of {world}; the shard groups and the replicate groups must each tile every rank"
        )
    return DPLayout(
        shard_group,
        replicate_group,
        dist.get_rank(shard_group),
        len(s_ranks),
        dist.get_rank(replicate_group),
        len(r_ranks),
        cast(dist.ProcessGroup, dist.group.WORLD),
    )


def _mesh_groups(mesh: Any) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if getattr(mesh, "ndim", None) != 2 or sorted(names) != sorted(MESH_DIMS):
        raise ValueError(
            f"zerocomm.attach: mesh= must be a 2D DeviceMesh with dims named {MESH_DIMS} "
            f"(init_device_mesh(..., mesh_dim_names={MESH_DIMS})), got dims {names or None}"
        )
    mesh_ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    if mesh_ranks != list(range(dist.get_world_size())):
        raise ValueError(
            f"zerocomm.attach: mesh= holds ranks {mesh_ranks}, which does not cover the world of "
            f"{dist.get_world_size()}; the mesh must hold every rank"
        )
    return mesh.get_group("shard"), mesh.get_group("replicate")


def describe_bad_tiling(facts: list[LayoutFacts | None], ranks: list[int]) -> str | None:
    """None when the ranks' groups tile the world as one grid (every rank
    names the same shard groups and replicate groups, and each replicate
    group holds the ranks with the same index in their shard groups);
    otherwise an error naming a rank that disagrees. Flat layouts (no rank
    hierarchical) are not checked here: the plan fingerprint covers them."""
    have = {r: f for r, f in zip(ranks, facts) if f is not None}
    if not any(f.replicate is not None for f in have.values()):
        return None
    head = "zerocomm.attach: the ranks disagree on the hierarchical layout: "
    for r, f in have.items():
        if f.replicate is None:
            other = next(q for q, g in have.items() if g.replicate is not None)
            return head + f"rank {r} attached flat (group {list(f.shard)}) but rank {other} hierarchically"
    for kind in ("shard", "replicate"):
        for r, f in have.items():
            mine = cast(tuple[int, ...], getattr(f, kind))
            for q in mine:
                theirs = getattr(have[q], kind) if q in have else None
                if theirs != mine:
                    return (
                        head + f"rank {r}'s {kind} group is {list(mine)} but rank {q}'s is "
                        f"{list(theirs) if theirs is not None else None}; every rank must pass the same groups "
                        "(create each group on every rank and pass each rank the ones holding it)"
                    )
    for r, f in have.items():
        assert f.replicate is not None
        index = {q: have[q].shard.index(q) for q in f.replicate}
        if len(set(index.values())) > 1:
            return head + (
                f"replicate group {list(f.replicate)} holds ranks at different positions in their shard groups "
                f"({', '.join(f'rank {q}: {i}' for q, i in index.items())}); a replicate group must hold "
                "the ranks with the same index in their shard groups (they hold the same shard)"
            )
    return None
