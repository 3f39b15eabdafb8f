"""Step 1 of the data flow: split a model into blocks, parameters, owners and buckets.

Pure Python (torch + stdlib only). The `Plan` built here is what the scheduler,
the hooks and the sharded optimizer all read, so it must be a deterministic
function of the model structure: every rank builds its own plan and they have
to agree without talking to each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

MODES = ("broadcast", "allgather")
PARTITIONS = ("balanced", "greedy")
_MIB = 1 << 20  # bucket_mb counts MiB, like DDP's bucket_cap_mb

Chunks = Union[nn.Module, Sequence[nn.Module]]
BlocksArg = Union[None, Sequence[nn.Module], Callable[[nn.Module], Iterable[nn.Module]]]


# --------------------------------------------------------------------------- data


@dataclass
class ParamSpec:
    name: str  # qualified name of the first occurrence ("chunk{c}." prefixed when several chunks)
    numel: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    block: int  # index of the block that owns it: the first block that uses it
    param: nn.Parameter = field(default=None, repr=False, compare=False)


@dataclass
class BlockSpec:
    name: str
    module: nn.Module = field(repr=False, compare=False)
    # every trainable plan param the block uses, tied ones owned by an earlier block included,
    # because the block's forward must wait for all of them
    params: list[int] = field(default_factory=list)


@dataclass
class Bucket:
    index: int
    blocks: list[int]  # blocks owning at least one param of the bucket, in order
    params: list[int]  # contiguous run of plan param indices
    owner: int | None  # broadcast: the rank that broadcasts it; allgather: None
    dtype: torch.dtype
    numel: int  # sum of aligned param slots
    padded_numel: int  # allgather: rounded up to world_size * align_elems; broadcast: == numel
    shard_numel: int  # allgather: padded_numel // world_size; broadcast: 0
    offsets: list[int]  # element offset of each param in the flat buffer, aligned to align_bytes

    @property
    def element_size(self) -> int:
        return _element_size(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.padded_numel * self.element_size


@dataclass
class Plan:
    mode: str
    world_size: int
    partition: str
    bucket_mb: float
    align_bytes: int
    blocks: list[BlockSpec]
    params: list[ParamSpec]
    buckets: list[Bucket]
    owner: list[int]  # per param: broadcast owner rank; -1 in allgather mode
    block_buckets: list[list[int]]  # per block: every bucket holding any param it uses
    rank_numel: list[int]  # per rank: owned numel (broadcast) or summed shard numel (allgather)
    _index: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _where: list[tuple[int, int]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # identity lookups: Parameter hashing by value would be wrong (and slow)
        self._index = {id(p.param): i for i, p in enumerate(self.params)}
        self._where = [(-1, -1)] * len(self.params)
        for b in self.buckets:
            for i, off in zip(b.params, b.offsets):
                self._where[i] = (b.index, off)

    @property
    def total_numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def imbalance(self) -> float:
        """max / mean of rank_numel; 1.0 for an empty plan (nothing to balance)."""
        total = sum(self.rank_numel)
        if total == 0:
            return 1.0
        return max(self.rank_numel) / (total / self.world_size)

    def param_index(self, param: torch.Tensor) -> int:
        try:
            return self._index[id(param)]
        except KeyError:
            raise ValueError(
                f"parameter of shape {tuple(param.shape)} is not in this plan "
                "(frozen, filtered out by param_filter, or not part of the model)"
            ) from None

    def param_owner(self, param: torch.Tensor) -> int:
        """Rank that owns `param` in broadcast mode; -1 in allgather mode (every rank owns a slice)."""
        return self.owner[self.param_index(param)]

    def locate(self, i: int) -> tuple[int, int]:
        """(bucket index, element offset in its flat buffer) of plan param i."""
        return self._where[i]

    def block_ranks(self, b: int) -> list[int]:
        """Ranks whose data block b needs before it can run."""
        if not self.blocks[b].params:
            return []
        if self.mode == "allgather":
            return list(range(self.world_size))
        return sorted({self.owner[i] for i in self.blocks[b].params})

    def summary(self) -> str:
        lines = [
            f"zerocomm plan: mode={self.mode} world_size={self.world_size} partition={self.partition} "
            f"bucket_mb={self.bucket_mb:g} align_bytes={self.align_bytes}",
            f"{len(self.params)} params ({self.total_numel:,} elements) in {len(self.blocks)} blocks, "
            f"{len(self.buckets)} buckets",
        ]
        rows = [("block", "name", "numel", "ranks", "buckets")]
        tied = False
        for b, blk in enumerate(self.blocks):
            owned = sum(self.params[i].numel for i in blk.params if self.params[i].block == b)
            shared = any(self.params[i].block != b for i in blk.params)
            tied |= shared
            ranks = self.block_ranks(b)
            ranks_s = "all" if self.mode == "allgather" else _ranges(ranks)
            rows.append((str(b), blk.name + (" *" if shared else ""), f"{owned:,}", ranks_s,
                         _ranges(self.block_buckets[b])))
        widths = [max(len(r[k]) for r in rows) for k in range(5)]
        for r in rows:
            lines.append("  ".join(
                r[k].ljust(widths[k]) if k == 1 else r[k].rjust(widths[k]) for k in range(5)).rstrip())
        if tied:
            lines.append("* also uses parameters owned by an earlier block (tied weights)")
        total = sum(self.rank_numel)
        load_rows = [("rank", "load", "share")] + [
            (str(r), f"{n:,}", f"{100.0 * n / total:.1f}%" if total else "-")
            for r, n in enumerate(self.rank_numel)
        ]
        lw = [max(len(r[k]) for r in load_rows) for k in range(3)]
        for r in load_rows:
            lines.append("  ".join(r[k].rjust(lw[k]) for k in range(3)))
        lines.append(f"imbalance (max/mean): {self.imbalance:.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------- partitioning


def _check_weights(weights: Sequence[int], parts: int) -> None:
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts must be an integer >= 1, got {parts!r}")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative")


def greedy_partition(weights: Sequence[int], parts: int) -> list[int]:
    """The seed's rule (InternEvo ParamAsyncBcastHandler): fill rank r and move on once
    its load exceeds 1.01x the floored average. Kept for comparison; it can leave the
    last ranks empty and overload the first (see tests)."""
    _check_weights(weights, parts)
    avg = float(sum(weights) // parts)
    owners, r, alloc = [], 0, 0
    for w in weights:
        owners.append(r)
        alloc += w
        if alloc > avg * 1.01 and r < parts - 1:
            r, alloc = r + 1, 0
    return owners


def _parts_needed(weights: Sequence[int], cap: int) -> int:
    count, load = 1, 0
    for w in weights:
        if load + w > cap:
            count, load = count + 1, w
        else:
            load += w
    return count


def balanced_partition(weights: Sequence[int], parts: int) -> list[int]:
    """Optimal contiguous partition: minimises the largest part's total weight.

    Binary search on the cap (greedy packing is an exact feasibility test for
    contiguous splits), then pack with the optimal cap. Among optimal splits it
    picks the one that gives every part at least one item when there are enough
    items, so no rank idles while another holds two parameters.
    """
    _check_weights(weights, parts)
    n = len(weights)
    if n == 0:
        return []
    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if _parts_needed(weights, mid) <= parts:
            hi = mid
        else:
            lo = mid + 1
    owners, r, load, count = [], 0, 0, 0
    for i, w in enumerate(weights):
        # move on when the cap is hit, or when the items left are just enough to give
        # each remaining part one (forced moves never break the cap: each item <= cap)
        if count and (load + w > lo or n - i <= parts - 1 - r):
            r, load, count = r + 1, 0, 0
        assert r < parts, "balanced_partition: packing overflowed (bug)"
        owners.append(r)
        load, count = load + w, count + 1
    return owners


# ------------------------------------------------------------------ discovery


@dataclass
class _RawBlock:
    name: str
    module: nn.Module
    params: list[nn.Parameter]  # every param (frozen included), module.parameters() order


def _as_chunks(chunks: Chunks) -> list[nn.Module]:
    if isinstance(chunks, nn.Module):
        return [chunks]
    if isinstance(chunks, (list, tuple)):
        if not chunks:
            raise ValueError("no model chunks given: pass a module or a non-empty list of modules")
        for c, m in enumerate(chunks):
            if not isinstance(m, nn.Module):
                raise TypeError(f"chunks[{c}] is a {type(m).__name__}, expected torch.nn.Module")
        return list(chunks)
    raise TypeError(f"model must be a torch.nn.Module or a list of them, got {type(chunks).__name__}")


def _contains_module_list(m: nn.Module) -> bool:
    return any(isinstance(s, nn.ModuleList) for s in m.modules())


def _auto_blocks(chunk: nn.Module, prefix: str, out: list[_RawBlock], seen: set[int]) -> None:
    def add(module: nn.Module, name: str, params: list[nn.Parameter]) -> None:
        if params:
            out.append(_RawBlock(prefix + name, module, params))

    def leaf(module: nn.Module, name: str) -> None:
        if id(module) in seen:  # the same module reached twice is one block
            return
        seen.add(id(module))
        add(module, name, list(module.parameters()))

    def walk(module: nn.Module, qual: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        # the module's own pre-hook fires before any child's, so its direct params go first
        add(module, qual or "<root>", list(module.parameters(recurse=False)))
        for name, child in module.named_children():
            cq = f"{qual}.{name}" if qual else name
            if isinstance(child, nn.ModuleList):
                if id(child) in seen:
                    continue
                seen.add(id(child))
                add(child, cq, list(child.parameters(recurse=False)))
                for i, el in child.named_children():
                    leaf(el, f"{cq}.{i}")
            elif _contains_module_list(child):
                walk(child, cq)
            else:
                leaf(child, cq)

    walk(chunk, "")


def _user_blocks(chunks: list[nn.Module], prefixes: list[str], blocks: BlocksArg) -> list[_RawBlock]:
    qualnames = [{id(m): q for q, m in ch.named_modules()} for ch in chunks]
    per_chunk: list[list[nn.Module]] = [[] for _ in chunks]
    if callable(blocks) and not isinstance(blocks, nn.Module):
        for c, ch in enumerate(chunks):
            got = blocks(ch)
            for m in _block_list(got, f"blocks(chunk {c})"):
                if id(m) not in qualnames[c]:
                    raise ValueError(
                        f"blocks(chunk {c}) returned a {type(m).__name__} that is not inside that model chunk")
                per_chunk[c].append(m)
    else:
        for k, m in enumerate(_block_list(blocks, "blocks")):
            c = next((c for c in range(len(chunks)) if id(m) in qualnames[c]), None)
            if c is None:
                raise ValueError(f"blocks[{k}] (a {type(m).__name__}) is not inside the model")
            per_chunk[c].append(m)

    out: list[_RawBlock] = []
    seen: set[int] = set()
    for c, ch in enumerate(chunks):
        covered: set[int] = set()
        for m in per_chunk[c]:
            if id(m) in seen:
                continue
            seen.add(id(m))
            params = list(m.parameters())
            covered.update(id(p) for p in params)
            if params:
                out.append(_RawBlock(prefixes[c] + (qualnames[c][id(m)] or "<root>"), m, params))
        # whatever the user's blocks miss still has to be synced before the chunk runs
        rest = [p for p in ch.parameters() if id(p) not in covered]
        if rest:
            out.append(_RawBlock(prefixes[c] + "<rest>", ch, rest))
    return out


def _block_list(blocks, what: str) -> list[nn.Module]:
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    if isinstance(blocks, nn.Module):
        return [blocks]
    if not isinstance(blocks, (list, tuple)):
        try:
            blocks = list(blocks)
        except TypeError:
            raise TypeError(
                f"{what} must be a list of modules or a callable (chunk) -> list of modules, "
                f"got {type(blocks).__name__}") from None
    for k, m in enumerate(blocks):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what}[{k}] is a {type(m).__name__}, expected torch.nn.Module")
    return list(blocks)


def check_plan_options(*, mode: object, partition: object, bucket_mb: object, align_bytes: object,
                       world_size: object = 1) -> None:
    """The one check of the plan's options (attach runs it before anything
    else; build_plan again for direct callers)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(map(repr, MODES))}")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}: expected one of {', '.join(map(repr, PARTITIONS))}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)):
        raise TypeError(f"bucket_mb must be a number of MiB, got {type(bucket_mb).__name__}")
    if not (0 < float(bucket_mb) <= 4096):  # also rejects NaN
        raise ValueError(f"bucket_mb must be in (0, 4096] MiB, got {bucket_mb}")
    if (isinstance(align_bytes, bool) or not isinstance(align_bytes, int) or align_bytes < 1
            or align_bytes & (align_bytes - 1)):
        raise ValueError(f"align_bytes must be a power of two >= 1, got {align_bytes!r}")


def chunk_prefix(c: int, n_chunks: int) -> str:
    """The one naming rule for models given as several chunks (pipeline
    stages): names inside chunk c are prefixed "chunk{c}."."""
    return f"chunk{c}." if n_chunks > 1 else ""


def _discover(chunks: list[nn.Module], blocks: BlocksArg) -> list[_RawBlock]:
    prefixes = [chunk_prefix(c, len(chunks)) for c in range(len(chunks))]
    if blocks is not None:
        return _user_blocks(chunks, prefixes, blocks)
    out: list[_RawBlock] = []
    seen: set[int] = set()
    for ch, prefix in zip(chunks, prefixes):
        _auto_blocks(ch, prefix, out, seen)
    return out


def discover_blocks(chunks: Chunks, blocks: BlocksArg = None) -> list[tuple[str, nn.Module]]:
    """Blocks of the model in forward order, as (name, module).

    A ModuleList child gives one block per element; a child containing a ModuleList
    deeper down is descended into with the same rules; any other child is one block.
    Direct parameters of a module we descended into form a block named after it
    ("<root>" for the chunk). `blocks=` (a list of modules or a callable
    chunk -> modules) overrides this; parameters it misses go to "<rest>".
    """
    return [(b.name, b.module) for b in _discover(_as_chunks(chunks), blocks)]


# ---------------------------------------------------------------------- plan


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _ranges(xs: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5': keeps the summary table narrow."""
    if not xs:
        return "-"
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def build_plan(
    chunks: Chunks,
    *,
    mode: str,
    world_size: int,
    partition: str = "balanced",
    bucket_mb: float = 25.0,
    align_bytes: int = 16,
    blocks: BlocksArg = None,
    param_filter: Callable[[str, nn.Parameter], bool] | None = None,
) -> Plan:
    """Build the synchronisation plan for `chunks` (a module or a list of pipeline chunks).

    Only trainable parameters accepted by `param_filter(name, param)` enter the plan
    (build one plan for dense and one for expert parameters to sync them over
    different groups). Tied parameters are recorded once, in the first block using them.
    """
    check_plan_options(mode=mode, partition=partition, bucket_mb=bucket_mb, align_bytes=align_bytes,
                       world_size=world_size)
    chunk_list = _as_chunks(chunks)
    raw = _discover(chunk_list, blocks)

    names: dict[int, str] = {}
    prefixes = [chunk_prefix(c, len(chunk_list)) for c in range(len(chunk_list))]
    for ch, prefix in zip(chunk_list, prefixes):
        for n, p in ch.named_parameters():
            names.setdefault(id(p), prefix + n)

    params: list[ParamSpec] = []
    block_specs: list[BlockSpec] = []
    index: dict[int, int] = {}
    rejected: set[int] = set()
    for rb in raw:
        used: list[int] = []
        for p in rb.params:
            if not p.requires_grad or id(p) in rejected:
                continue
            i = index.get(id(p))
            if i is None:
                name = names[id(p)]
                if param_filter is not None and not param_filter(name, p):
                    rejected.add(id(p))
                    continue
                i = index[id(p)] = len(params)
                params.append(ParamSpec(name, p.numel(), tuple(p.shape), p.dtype, len(block_specs), p))
            if i not in used:
                used.append(i)
        if used:  # blocks with nothing to sync in this plan get no hook and no wait
            block_specs.append(BlockSpec(rb.name, rb.module, used))

    cap = bucket_mb * _MIB
    slot_bytes = [
        _round_up(p.numel, max(1, align_bytes // _element_size(p.dtype))) * _element_size(p.dtype)
        for p in params
    ]
    groups: list[list[int]] = []
    if mode == "broadcast":
        weights = [p.numel for p in params]
        fn = balanced_partition if partition == "balanced" else greedy_partition
        owner = fn(weights, world_size)
        cur_bytes = 0
        for i, p in enumerate(params):
            # one launch per run of a rank's consecutive params of one dtype, up to the cap
            if (groups and owner[groups[-1][-1]] == owner[i] and params[groups[-1][-1]].dtype == p.dtype
                    and cur_bytes + slot_bytes[i] <= cap):
                groups[-1].append(i)
                cur_bytes += slot_bytes[i]
            else:
                groups.append([i])
                cur_bytes = slot_bytes[i]
        rank_numel = [0] * world_size
        for w, r in zip(weights, owner):
            rank_numel[r] += w
    else:
        owner = [-1] * len(params)
        cur_bytes = 0
        for b, blk in enumerate(block_specs):
            owned = [i for i in blk.params if params[i].block == b]
            # a block is split only where its dtype changes (each bucket has one dtype)
            segs: list[list[int]] = []
            for i in owned:
                if segs and params[segs[-1][-1]].dtype == params[i].dtype:
                    segs[-1].append(i)
                else:
                    segs.append([i])
            for seg in segs:
                seg_bytes = sum(slot_bytes[i] for i in seg)
                if (groups and params[groups[-1][-1]].dtype == params[seg[0]].dtype
                        and cur_bytes + seg_bytes <= cap):
                    groups[-1].extend(seg)
                    cur_bytes += seg_bytes
                else:
                    groups.append(list(seg))
                    cur_bytes = seg_bytes
        rank_numel = [0] * world_size  # filled below from the shards

    buckets: list[Bucket] = []
    for k, g in enumerate(groups):
        dtype = params[g[0]].dtype
        ae = max(1, align_bytes // _element_size(dtype))
        offsets, off = [], 0
        for i in g:
            offsets.append(off)
            off += _round_up(params[i].numel, ae)
        if mode == "allgather":
            padded = _round_up(off, world_size * ae)  # every shard starts aligned
            shard = padded // world_size
        else:
            padded, shard = off, 0
        blks = list(dict.fromkeys(params[i].block for i in g))
        buckets.append(Bucket(k, blks, list(g), None if mode == "allgather" else owner[g[0]],
                              dtype, off, padded, shard, offsets))
    if mode == "allgather":
        rank_numel = [sum(b.shard_numel for b in buckets)] * world_size

    bucket_of = {i: b.index for b in buckets for i in b.params}
    block_buckets = [sorted({bucket_of[i] for i in blk.params}) for blk in block_specs]
    return Plan(mode, world_size, partition, float(bucket_mb), align_bytes, block_specs, params,
                buckets, owner, block_buckets, rank_numel)
