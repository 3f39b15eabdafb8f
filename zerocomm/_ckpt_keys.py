"""Which ranks of a checkpoint hold the same values, and the key each entry
is saved under ([Note: checkpoint keys] in docs/design.md).

Every plan's parameters hold the same values on all ranks of the plan's
*value set*: the ranks its group and its replicas join (the whole
data-parallel group for the dense plan). An expert plan synced over
sub-groups (`attach(..., expert_group=...)`) has several value sets, the
expert groups: ranks of different expert groups hold different experts under
the same names. Their entries are saved once per expert group, under

    experts.<g>.<key>      (<key>: model.<...>, optim.state.<...>, optim.master.<...>)

where g numbers the expert groups by their lowest global rank. Entries no
plan syncs (buffers, frozen parameters) are saved once when every rank holds
the same bytes, per expert group when they differ only between expert groups;
differing inside an expert group is an error (which one would be right?).
With one value set per plan nothing is prefixed: those checkpoints are the
flat ones of zerocomm before expert groups, byte for byte in their keys.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.distributed as dist

from .blocks import chunk_prefix

if TYPE_CHECKING:
    from .shards import ShardedOptimizer

STATE, MASTER, MODEL = "optim.state.", "optim.master.", "model."
EXPERTS = "experts."
_PREFIX = re.compile(r"experts\.(\d+)\.")


@dataclass(frozen=True)
class Keys:
    """This rank's place in the checkpoint's key space."""

    n_groups: int = 1  # expert groups with values of their own (1: no expert sub-groups)
    index: int | None = None  # this rank's expert group (None when n_groups == 1)
    own: frozenset[str] = frozenset()  # model keys and param names saved per expert group
    groups: tuple[tuple[int, ...], ...] = ()  # global ranks of each expert group, by index
    expert_keys: frozenset[str] = field(default=frozenset())  # model keys of the expert plan's parameters

    def key(self, name: str, key: str) -> str:
        """Checkpoint key of `key`, an entry of parameter or model key `name`."""
        return f"{EXPERTS}{self.index}.{key}" if name in self.own else key

    def for_checkpoint(self, saved: Iterable[str]) -> Keys:
        """The keys to load from a checkpoint holding `saved`: which entries
        no plan syncs were saved per expert group is the checkpoint's fact."""
        if self.index is None:
            return self
        pre = f"{EXPERTS}{self.index}."
        mine = {k[len(pre) :] for k in saved if k.startswith(pre)}
        per_group = {k[len(MODEL) :] for k in mine if k.startswith(MODEL)}
        return Keys(self.n_groups, self.index, self.own | per_group, self.groups, self.expert_keys)


def split(key: str) -> tuple[int | None, str]:
    """(expert group, key without the prefix) of a checkpoint key."""
    m = _PREFIX.match(key)
    return (None, key) if m is None else (int(m.group(1)), key[m.end() :])


def saved_groups(keys: Iterable[str]) -> int:
    """How many expert groups a checkpoint holding `keys` was saved by."""
    found = {g for g, _ in map(split, keys) if g is not None}
    return max(found) + 1 if found else 1


def own_view(entries: dict[str, Any]) -> dict[str, Any]:
    """`view` of the one expert group whose entries `entries` holds (what
    one rank's `sharded_state_dict` holds)."""
    found = {g for g, _ in map(split, entries) if g is not None}
    if len(found) > 1:
        raise ValueError(
            f"the state dict holds the entries of several expert groups {sorted(found)}; one rank's has one"
        )
    return view(entries, found.pop() if found else None)


def view(entries: dict[str, Any], group: int | None) -> dict[str, Any]:
    """The entries as expert group `group` sees them, prefixes removed:
    the shared ones, and that group's own in place of nothing (None: a
    checkpoint without expert groups)."""
    out = {k: v for k, v in entries.items() if split(k)[0] is None}
    for k, v in entries.items():
        g, rest = split(k)
        if g is not None and g == group:
            out[rest] = v
    return out


def ranks_of(group: Any) -> tuple[int, ...]:
    if group is None or not dist.is_initialized():
        return (0,)
    return tuple(dist.get_process_group_ranks(group))


def checkpoint_group(zopt: "ShardedOptimizer") -> Any:
    """Every rank holding part of the model: the dense plan's shard group
    and its replicas (the world when hierarchical, the group when flat)."""
    layout = zopt.layouts.get(zopt.sharded_plans[0].name)
    return layout.group if layout is not None else zopt.group


@dataclass(frozen=True)
class Report:
    """What one rank tells the others to place the entries (plain data)."""

    rank: int  # global
    shard: tuple[int, ...]  # global ranks of its expert plan's shard group
    replicas: tuple[int, ...] | None  # and of that plan's replicate group (None: flat)
    digests: dict[str, str] | None  # model entries no plan syncs, when the experts may differ


def _value_sets(by_rank: dict[int, Report], members: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The expert groups: ranks joined by the expert plan's shard groups
    and replicate groups (they hold the same experts), ordered by lowest
    rank. Checked: every rank's groups hold it, the same groups on every
    member, none outside `members`."""
    for kind in ("shard", "replicas"):
        for r, rep in by_rank.items():
            grp = getattr(rep, kind) or (r,)
            outside = sorted(set(grp) - set(members))
            if r not in grp or outside:
                raise ValueError(
                    f"the expert plan's {'replicate' if kind == 'replicas' else 'shard'} group of rank {r}, "
                    f"{list(grp)}, is not a sub-group of the data-parallel group {list(members)} holding rank {r}"
                )
            for m in grp:
                theirs = getattr(by_rank[m], kind) or (m,)
                if tuple(sorted(theirs)) != tuple(sorted(grp)):
                    raise ValueError(
                        f"the expert groups differ between ranks: rank {r} is in {list(grp)} but rank {m} "
                        f"is in {list(theirs)}; every rank must pass its own group of one partition"
                    )
    root = {r: r for r in members}

    def find(r: int) -> int:
        while root[r] != r:
            r = root[r]
        return r

    for r, rep in by_rank.items():
        for m in rep.shard + (rep.replicas or ()):
            root[find(m)] = find(r)
    sets: dict[int, list[int]] = {}
    for r in members:
        sets.setdefault(find(r), []).append(r)
    return sorted((tuple(sorted(v)) for v in sets.values()), key=min)


def digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def report(zopt: "ShardedOptimizer", *, compare_unplanned: bool) -> Report | None:
    """This rank's report; None (and nothing to share) without an expert
    plan. Collective-free. `compare_unplanned` (to save): the digests of
    the model entries no plan syncs."""
    plans = zopt.sharded_plans
    if len(plans) < 2 or not dist.is_initialized():
        return None
    if len(plans) > 2:
        raise NotImplementedError(f"checkpoints know one expert plan, this optimizer has {len(plans) - 1}")
    layout = zopt.layouts.get(plans[1].name)
    shard = ranks_of(plans[1].group)
    replicas = ranks_of(layout.replicate_group) if layout is not None and layout.replicate_group is not None else None
    digests = None
    if compare_unplanned and set(shard) | set(replicas or ()) != set(ranks_of(checkpoint_group(zopt))):
        planned = {id(zopt.user_params[i]) for p in plans for i in p.params}
        digests = {k: digest(v) for k, v in model_entries(zopt, keep_vars=True).items() if id(v) not in planned}
    return Report(dist.get_rank(), shard, replicas, digests)


def resolve(zopt: "ShardedOptimizer", reports: list[Any] | None) -> Keys:
    """This rank's keys from every rank's `report` (the same list on all
    ranks, so every rank raises the same error or none)."""
    if not reports or reports[0] is None:
        return Keys()
    members = ranks_of(checkpoint_group(zopt))
    by_rank: dict[int, Report] = {r.rank: r for r in reports}
    if sorted(by_rank) != sorted(members):
        raise ValueError(f"the checkpoint's ranks {sorted(by_rank)} are not the data-parallel group {list(members)}")
    groups = _value_sets(by_rank, members)
    if len(groups) == 1:
        return Keys()
    expert = zopt.sharded_plans[1]
    experts = {id(zopt.user_params[i]) for i in expert.params}
    expert_keys = frozenset(k for k, v in model_entries(zopt, keep_vars=True).items() if id(v) in experts)
    own = set(expert_keys) | {zopt.param_names[i] for i in expert.params}
    for k in by_rank[members[0]].digests or {}:
        by_group = [{(by_rank[r].digests or {}).get(k) for r in g} for g in groups]
        inside = next((g for g, seen in zip(groups, by_group) if len(seen) > 1), None)
        if inside is not None:
            raise ValueError(
                f"model entry {k!r} differs between ranks {list(inside)} of one expert group "
                "and no zerocomm plan syncs it: make it equal on the ranks that share their "
                "experts (it is saved once per expert group)"
            )
        if len(set().union(*by_group)) > 1:
            own.add(k)
    me = dist.get_rank()
    index = next(i for i, g in enumerate(groups) if me in g)
    return Keys(len(groups), index, frozenset(own), tuple(groups), expert_keys)


def model_entries(zopt: "ShardedOptimizer", *, keep_vars: bool = False) -> dict[str, Any]:
    """The model's state dict over all chunks, under the names checkpoints use."""
    return {
        chunk_prefix(c, len(zopt.chunks)) + k: v
        for c, chunk in enumerate(zopt.chunks)
        for k, v in chunk.state_dict(keep_vars=keep_vars).items()
    }


def check_groups(keys: Keys, saved: int) -> None:
    """A checkpoint of `saved` expert groups into a run of `keys.n_groups`
    (a checkpoint without per-group entries suits a run without experts)."""
    if saved == keys.n_groups or (saved == 1 and not keys.expert_keys):
        return
    run = (
        f"this run has {keys.n_groups} expert groups {[list(g) for g in keys.groups]}"
        if keys.n_groups > 1
        else "this run has no expert sub-groups (one set of experts)"
    )
    raise ValueError(
        f"the checkpoint holds the experts of {saved} expert group{'s' if saved > 1 else ''} but {run}: "
        f"load it with {saved} expert group{'s' if saved > 1 else ''} (the g-th by lowest rank gets the "
        "g-th one's experts), or take one group's model with consolidate(..., expert_group=g)"
    )
