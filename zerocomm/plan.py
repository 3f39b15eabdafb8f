"""Step 1 of the data flow (docs/design.md): a model as blocks, parameters,
owners and buckets.

Pure Python (torch + stdlib only). The `Plan` built here is what the scheduler,
the hooks and the sharded optimizer all read, so it must be a deterministic
function of the model structure: every rank builds its own plan and they have
to agree without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence, cast

import torch
from torch import nn

from .blocks import BlocksArg, Chunks, as_chunks, chunk_prefix, discover
from .partition import PARTITIONS, balanced_partition, greedy_partition

MODES = ("broadcast", "allgather")  # the keys of LAYOUTS
_MIB = 1 << 20  # bucket_mb counts MiB, like DDP's bucket_cap_mb


class Piece(NamedTuple):
    """A parameter's elements inside one slice of a bucket's flat buffer."""

    param: int  # plan param index
    start: int  # first element inside the parameter
    at: int  # first element inside the flat buffer
    numel: int


@dataclass
class ParamSpec:
    name: str  # qualified name of the first occurrence ("chunk{c}." prefixed when several chunks)
    numel: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    block: int  # index of the block that owns it: the first block that uses it
    param: nn.Parameter = field(default=cast(nn.Parameter, None), repr=False, compare=False)


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

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[start, end) of `rank`'s slice of the flat buffer (allgather mode)."""
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

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

    def pieces(self, b: Bucket, lo: int, hi: int) -> list[Piece]:
        """Every piece of a parameter of bucket `b` that falls into [lo, hi)
        of its flat buffer (allgather: a rank's shard is `b.shard_range(rank)`)."""
        out = []
        for i, off in zip(b.params, b.offsets):
            a, e = max(off, lo), min(off + self.params[i].numel, hi)
            if a < e:
                out.append(Piece(i, a - off, a, e - a))
        return out

    def locate(self, i: int) -> tuple[int, int]:
        """(bucket index, element offset in its flat buffer) of plan param i."""
        return self._where[i]

    def block_ranks(self, b: int) -> list[int]:
        """Ranks whose data block b needs before it can run."""
        if not self.blocks[b].params:
            return []
        if not LAYOUTS[self.mode].owned:
            return list(range(self.world_size))
        return sorted({self.owner[i] for i in self.blocks[b].params})

    def summary(self) -> str:
        lines = [
            f"zerocomm plan: mode={self.mode} world_size={self.world_size} partition={self.partition} "
            f"bucket_mb={self.bucket_mb:g} align_bytes={self.align_bytes}",
            f"{len(self.params)} params ({self.total_numel:,} elements) in {len(self.blocks)} blocks, "
            f"{len(self.buckets)} buckets",
        ]
        rows: list[tuple[str, ...]] = [("block", "name", "numel", "ranks", "buckets")]
        tied = False
        for b, blk in enumerate(self.blocks):
            owned = sum(self.params[i].numel for i in blk.params if self.params[i].block == b)
            shared = any(self.params[i].block != b for i in blk.params)
            tied |= shared
            ranks = self.block_ranks(b)
            ranks_s = _ranges(ranks) if LAYOUTS[self.mode].owned else "all"
            rows.append(
                (str(b), blk.name + (" *" if shared else ""), f"{owned:,}", ranks_s, _ranges(self.block_buckets[b]))
            )
        widths = [max(len(r[k]) for r in rows) for k in range(5)]
        for r in rows:
            lines.append(
                "  ".join(r[k].ljust(widths[k]) if k == 1 else r[k].rjust(widths[k]) for k in range(5)).rstrip()
            )
        if tied:
            lines.append("* also uses parameters owned by an earlier block (tied weights)")
        total = sum(self.rank_numel)
        load_rows: list[tuple[str, ...]] = [("rank", "load", "share")]
        load_rows += [
            (str(r), f"{n:,}", f"{100.0 * n / total:.1f}%" if total else "-") for r, n in enumerate(self.rank_numel)
        ]
        lw = [max(len(r[k]) for r in load_rows) for k in range(3)]
        for r in load_rows:
            lines.append("  ".join(r[k].rjust(lw[k]) for k in range(3)))
        lines.append(f"imbalance (max/mean): {self.imbalance:.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def check_plan_options(
    *, mode: object, partition: object, bucket_mb: object, align_bytes: object, world_size: object = 1
) -> None:
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
    if (
        isinstance(align_bytes, bool)
        or not isinstance(align_bytes, int)
        or align_bytes < 1
        or align_bytes & (align_bytes - 1)
    ):
        raise ValueError(f"align_bytes must be a power of two >= 1, got {align_bytes!r}")


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


@dataclass(frozen=True)
class Layout:
    """What a mode means for the plan: whole parameters per owner rank
    (`owned`, broadcast) or every bucket split evenly over the ranks."""

    owned: bool


LAYOUTS = {"broadcast": Layout(owned=True), "allgather": Layout(owned=False)}


def broadcast_groups(owner: list[int], slot_bytes: list[int], dtypes: Sequence[object], cap: float) -> list[list[int]]:
    """Buckets of broadcast mode, as runs of parameter indices: one launch
    per run of a rank's consecutive parameters of one dtype, up to `cap`
    bytes. Pure: benchmarks/scale_model.py plans models of any size with it."""
    groups: list[list[int]] = []
    cur = 0
    for i, nb in enumerate(slot_bytes):
        last = groups[-1][-1] if groups else None
        if last is not None and owner[last] == owner[i] and dtypes[last] == dtypes[i] and cur + nb <= cap:
            groups[-1].append(i)
            cur += nb
        else:
            groups.append([i])
            cur = nb
    return groups


def allgather_groups(
    block_params: list[list[int]], slot_bytes: list[int], dtypes: Sequence[object], cap: float
) -> list[list[int]]:
    """Buckets of allgather mode, as runs of parameter indices: consecutive
    blocks (each the parameters it owns, in order) share a bucket up to
    `cap` bytes; a block is split where its dtype changes, and a block bigger
    than the cap is cut at parameter boundaries ([Note: bucket size])."""
    groups: list[list[int]] = []
    cur = 0
    for owned in block_params:
        segs: list[list[int]] = []
        for i in owned:
            if segs and dtypes[segs[-1][-1]] == dtypes[i]:
                segs[-1].append(i)
            else:
                segs.append([i])
        for seg in segs:
            seg_bytes = sum(slot_bytes[i] for i in seg)
            same = bool(groups) and dtypes[groups[-1][-1]] == dtypes[seg[0]]
            if same and cur + seg_bytes <= cap:
                groups[-1].extend(seg)
                cur += seg_bytes
            elif seg_bytes <= cap:
                groups.append(list(seg))
                cur = seg_bytes
            else:
                for i in seg:
                    if same and cur + slot_bytes[i] <= cap:
                        groups[-1].append(i)
                        cur += slot_bytes[i]
                    else:
                        groups.append([i])
                        cur = slot_bytes[i]
                    same = True
    return groups


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
    check_plan_options(
        mode=mode, partition=partition, bucket_mb=bucket_mb, align_bytes=align_bytes, world_size=world_size
    )
    return plan_model(
        chunks,
        mode=mode,
        world_size=world_size,
        partition=partition,
        bucket_mb=bucket_mb,
        align_bytes=align_bytes,
        blocks=blocks,
        param_filter=param_filter,
    )


def plan_model(
    chunks: Chunks,
    *,
    mode: str,
    world_size: int,
    partition: str,
    bucket_mb: float,
    align_bytes: int,
    blocks: BlocksArg,
    param_filter: Callable[[str, nn.Parameter], bool] | None,
) -> Plan:
    """`build_plan` for options already checked (attach checked them:
    validate.check_options runs `check_plan_options` once)."""
    chunk_list = as_chunks(chunks)
    raw = discover(chunk_list, blocks)

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
        _round_up(p.numel, max(1, align_bytes // _element_size(p.dtype))) * _element_size(p.dtype) for p in params
    ]
    dtypes = [p.dtype for p in params]
    layout = LAYOUTS[mode]
    if layout.owned:
        weights = [p.numel for p in params]
        fn = balanced_partition if partition == "balanced" else greedy_partition
        owner = fn(weights, world_size)
        groups = broadcast_groups(owner, slot_bytes, dtypes, cap)
        rank_numel = [0] * world_size
        for w, r in zip(weights, owner):
            rank_numel[r] += w
    else:
        owner = [-1] * len(params)
        owned = [[i for i in blk.params if params[i].block == b] for b, blk in enumerate(block_specs)]
        groups = allgather_groups(owned, slot_bytes, dtypes, cap)
        rank_numel = [0] * world_size  # filled below from the shards

    buckets: list[Bucket] = []
    for k, g in enumerate(groups):
        dtype = params[g[0]].dtype
        ae = max(1, align_bytes // _element_size(dtype))
        offsets, off = [], 0
        for i in g:
            offsets.append(off)
            off += _round_up(params[i].numel, ae)
        if layout.owned:
            padded, shard = off, 0
        else:
            padded = _round_up(off, world_size * ae)  # every shard starts aligned
            shard = padded // world_size
        blks = list(dict.fromkeys(params[i].block for i in g))
        buckets.append(
            Bucket(k, blks, list(g), owner[g[0]] if layout.owned else None, dtype, off, padded, shard, offsets)
        )
    if not layout.owned:
        rank_numel = [sum(b.shard_numel for b in buckets)] * world_size

    bucket_of = {i: b.index for b in buckets for i in b.params}
    block_buckets = [sorted({bucket_of[i] for i in blk.params}) for blk in block_specs]
    return Plan(
        mode,
        world_size,
        partition,
        float(bucket_mb),
        align_bytes,
        block_specs,
        params,
        buckets,
        owner,
        block_buckets,
        rank_numel,
    )
