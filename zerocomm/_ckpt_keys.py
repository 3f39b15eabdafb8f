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


def _value_sets(reported: list[tuple[int, ...]], members: tuple[int, ...], what: str) -> list[tuple[int, ...]]:
    """The expert groups the ranks reported, checked: each rank's group
    contains it, the same group on every member, none outside `members`."""
    by_rank = dict(zip(members, reported))
    for r, grp in by_rank.items():
        outside = sorted(set(grp) - set(members))
        if outside:
            raise ValueError(
                f"the {what} group of rank {r} holds ranks {outside} outside the data-parallel "
                f"group {list(members)}: an expert group must be a sub-group of it"
            )
        for m in grp:
            if tuple(by_rank[m]) != tuple(grp):
                raise ValueError(
                    f"the {what} groups differ between ranks: rank {r} is in {list(grp)} but rank {m} "
                    f"is in {list(by_rank[m])}; every rank must pass its own group of one partition"
                )
    return sorted({tuple(sorted(g)) for g in reported}, key=min)


def digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Report:
    """What one rank tells the others to place the entries (plain data)."""

    rank: int  # global
    expert_group: tuple[int, ...]  # global ranks of its expert plan's group
    digests: dict[str, str] | None  # model entries no plan syncs, when its expert group is a sub-group


def report(zopt: "ShardedOptimizer", *, compare_unplanned: bool) -> Report | None:
    """This rank's report; None (and nothing to share) without an expert
    plan. Collective-free. `compare_unplanned` (to save): the digests of
    the model entries no plan syncs."""
    plans = zopt.sharded_plans
    if len(plans) < 2 or not dist.is_initialized():
        return None
    if len(plans) > 2:
        raise NotImplementedError(f"checkpoints know one expert plan, this optimizer has {len(plans) - 1}")
    mine = ranks_of(plans[1].group)
    digests = None
    if compare_unplanned and tuple(sorted(mine)) != tuple(sorted(ranks_of(zopt.group))):
        planned = {id(zopt.user_params[i]) for p in plans for i in p.params}
        digests = {k: digest(v) for k, v in model_entries(zopt, keep_vars=True).items() if id(v) not in planned}
    return Report(dist.get_rank(), mine, digests)


def resolve(zopt: "ShardedOptimizer", reports: list[Any] | None) -> Keys:
    """This rank's keys from every rank's `report` (the same list on all
    ranks, so every rank raises the same error or none)."""
    if not reports or reports[0] is None:
        return Keys()
    members = ranks_of(zopt.group)
    by_rank: dict[int, Report] = {r.rank: r for r in reports}
    if sorted(by_rank) != sorted(members):
        raise ValueError(f"the checkpoint's ranks {sorted(by_rank)} are not the data-parallel group {list(members)}")
    groups = _value_sets([by_rank[r].expert_group for r in members], members, "expert")
    if len(groups) == 1:
        return Keys()
    plans = zopt.sharded_plans
    expert = plans[1]
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
