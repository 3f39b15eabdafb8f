"""Step overlap: how much of the post-step parameter sync each ZeRO-1 scheme hides.

    python benchmarks/overlap.py --device cpu --world-size 2        # ~1-3 min on 2 cores
    torchrun --nproc-per-node 1 benchmarks/overlap.py --device cuda # NCCL (world size 1 works)
    python benchmarks/overlap.py --device cpu --transport simulated --sim-bandwidth-gbps 2

Trains zerocomm.models.TinyGPT (size set by flags) for a few steps on the same
model and data in every variant, in one run:

real transport (gloo on CPU, NCCL on CUDA), `--transport real|all`:
  zero_torch      (a) torch.distributed.optim.ZeroRedundancyOptimizer(AdamW). Grads are
                  all-reduced by hand (one flat all_reduce, averaged) after backward;
                  its step() broadcasts every rank's parameters and blocks on them, so
                  that whole param sync is exposed (timed around its _sync_params()).
  seed_bcast      (b) the seed's scheme (InternEvo ParamAsyncBcastHandler), re-implemented
                  here only: owners = optimal contiguous partition by numel over the
                  params in forward order, each rank steps its own params with a local
                  AdamW, then dist.broadcast(p, src=owner, async_op=True) per param on
                  the default group; a forward pre-hook per block (top-level children,
                  ModuleList elements) calls Work.wait() on every pending handle of the
                  ranks that block spans. Grads: same hand all-reduce as (a).
                  exposed = time inside Work.wait(); total = first issue -> last
                  completion (gloo future callbacks) per step.
  zc_broadcast    (c) zerocomm.attach(model, AdamW, mode="broadcast", bucket_mb=...)
  zc_allgather    (d) zerocomm.attach(model, AdamW, mode="allgather", bucket_mb=...)
                  total/exposed from zopt.enable_tracing() / zopt.stats()
                  (sync_total_s: param buckets on the comm lane; sync_exposed_s: time
                  the compute thread waited for them).
  ddp             (e) DistributedDataParallel + unsharded AdamW (no param sync at all;
                  grad all-reduce overlapped with backward). The reference for step time.

simulated transport (zerocomm.transport.SimulatedTransport: world size 1 per process,
the comm worker is occupied for latency + bytes/bandwidth of a modelled ring),
`--transport simulated|all`:
  sim_zc_broadcast, sim_zc_allgather   zerocomm over the simulated transport
  sim_blocking    unsharded AdamW step, then the modelled param-sync time spent
                  synchronously (sleep) before the next forward: exposed == total.
  --auto-sim (default) measures the forward pass first and picks, per mode, the
  bandwidth at which the modelled sync of one step takes as long as that forward
  (bandwidth = factor * param bytes / (forward - n_buckets * latency); factor 1 for
  broadcast, (W-1)/W for the ring all-gather of W = --sim-world ranks).
  Acceptance (printed, stored): zerocomm's exposed sync <= 10% of its total sync
  while the blocking baseline exposes all of it.

Step time = time between consecutive step starts (forward + backward + step),
median and IQR over the steps after warm-up; on CUDA measured with events on the
compute stream (no per-step device sync, which would serialise the comm stream).
Each interval's forward contains the waits for the sync launched by the step
before it, so the intervals are steady-state comparable across variants.
Peak memory: CPU ru_maxrss per rank, reset per variant (/proc/self/clear_refs 5);
CUDA torch.cuda.max_memory_allocated. Optimizer-state bytes: tensors (dim > 0) in the
(local) optimizer's state on each rank.

Outputs in --out (default benchmarks/out/): overlap_<device>.json, overlap_<device>.png
(bars), overlap_timeline_<device>.png (one step of zerocomm from its trace) and
overlap_trace_<variant>_<device>.json (Chrome traces, rank 0).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

REAL_VARIANTS = ["zero_torch", "seed_bcast", "zc_broadcast", "zc_allgather", "ddp"]
SIM_VARIANTS = ["sim_blocking", "sim_zc_broadcast", "sim_zc_allgather"]
LABELS = {
    "zero_torch": "(a) torch ZeRO\n(blocking)",
    "seed_bcast": "(b) seed: async bcast\n+ Work.wait hooks",
    "zc_broadcast": "(c) zerocomm\nbroadcast",
    "zc_allgather": "(d) zerocomm\nallgather",
    "ddp": "(e) DDP\n(no param sync)",
    "sim_blocking": "blocking\n(sleep after step)",
    "sim_zc_broadcast": "zerocomm\nbroadcast",
    "sim_zc_allgather": "zerocomm\nallgather",
}
ACCEPT_FRACTION = 0.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--world-size", type=int, default=2, help="CPU ranks to spawn (ignored under torchrun)")
    ap.add_argument("--dim", type=int, default=None, help="model width (default 256 cpu, 1024 cuda)")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default 6 cpu, 12 cuda)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default 4 cpu, 16 cuda)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 64 cpu, 512 cuda)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 256 cpu, 8192 cuda)")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant, warm-up included (default 24 cpu, 30 cuda)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--bucket-mb", type=float, default=1.0,
                    help="zerocomm bucket cap in MiB (small enough that blocks get their own buckets)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--transport", choices=["all", "real", "simulated"], default="all",
                    help="real: the five real-transport variants; simulated: zerocomm on "
                         "SimulatedTransport + blocking baseline; all: both (default)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of " + ",".join(REAL_VARIANTS + SIM_VARIANTS))
    ap.add_argument("--sim-latency-us", type=float, default=20.0)
    ap.add_argument("--sim-bandwidth-gbps", type=float, default=None,
                    help="fixed simulated bandwidth (GB/s); implies --no-auto-sim")
    ap.add_argument("--auto-sim", action=argparse.BooleanOptionalAction, default=True,
                    help="calibrate the simulated bandwidth so one step's param sync ~= the forward pass")
    ap.add_argument("--sim-world", type=int, default=8, help="modelled world size of the simulated ring")
    ap.add_argument("--sim-ranks", choices=["one", "all"], default="one",
                    help="simulated runs on rank 0 only (default: the other ranks' compute would "
                         "compete for this machine's cores) or on every rank at once")
    ap.add_argument("--sim-extra-layers", type=int, default=24,
                    help="also run sim allgather on a model with this many layers (0: off) "
                         "to show how exposure scales with the number of blocks")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    for name, cpu_v, cuda_v in (("dim", 256, 1024), ("layers", 6, 12), ("heads", 4, 16), ("seq", 64, 512),
                                ("vocab", 256, 8192), ("steps", 24, 30)):
        if getattr(args, name) is None:
            setattr(args, name, cuda_v if cuda else cpu_v)
    if args.sim_bandwidth_gbps is not None:
        args.auto_sim = False
    if args.steps < args.warmup + 3:
        ap.error("--steps must be at least --warmup + 3")
    if args.variants:
        bad = set(args.variants.split(",")) - set(REAL_VARIANTS + SIM_VARIANTS)
        if bad:
            ap.error(f"unknown variants: {sorted(bad)}")
    return args


# ---------------------------------------------------------------- helpers


class Clock:
    """Time marks: perf_counter on CPU, CUDA events on the current stream."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a

    def resolve(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Recorder:
    """Per-step phase marks: start, after forward, after backward (+ grad sync), end."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.marks: list[dict] = []
        self.losses: list[torch.Tensor] = []

    def mark(self, key: str) -> None:
        if key == "start":
            self.marks.append({})
        self.marks[-1][key] = self.clock.mark()

    def finish(self, warmup: int) -> dict:
        """marks[-1] is the start mark recorded after the last step."""
        self.clock.resolve()
        el = self.clock.elapsed
        steps = self.marks[:-1]
        step_t = [el(steps[i]["start"], self.marks[i + 1]["start"]) for i in range(len(steps))]
        fwd = [el(m["start"], m["fwd"]) for m in steps]
        bwd = [el(m["fwd"], m["bwd"]) for m in steps]
        opt = [el(m["bwd"], m["end"]) for m in steps]
        return {
            "step_s": step_t[warmup:], "forward_s": fwd[warmup:], "backward_s": bwd[warmup:],
            "optimizer_s": opt[warmup:], "all_step_s": step_t,
            "losses": [float(x) for x in self.losses],
        }


def state_bytes(optim: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optim.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def lm_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = module(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"median": None, "q25": None, "q75": None, "iqr": None, "n": 0}
    s = sorted(xs)

    def q(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"median": q(0.5), "q25": q(0.25), "q75": q(0.75), "iqr": q(0.75) - q(0.25), "n": len(s),
            "mean": sum(s) / len(s), "min": s[0], "max": s[-1]}


def _vm_rss_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Memory:
    """Peak memory of one variant on this rank."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.resettable = False
        try:  # hand freed heap back to the OS so the base (and the peak) are this variant's
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:  # resets the peak RSS that getrusage reports (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            pass
        self.base = _vm_rss_kb() * 1024

    def peak(self) -> dict:
        if self.cuda:
            return {"peak_bytes": torch.cuda.max_memory_allocated(), "base_bytes": self.base,
                    "kind": "torch.cuda.max_memory_allocated"}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": peak, "base_bytes": self.base,
                "kind": "ru_maxrss" + (" (reset per variant)" if self.resettable else " (process lifetime)")}


# ---------------------------------------------------------------- context


class Ctx:
    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.cuda = device.type == "cuda"
        self.group = None  # the group zerocomm and the sim collectives use (None: world)
        self.group_size = world
        self.clock = Clock(self.cuda)
        self.mem = Memory(self.cuda)
        self._batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_model(self, layers: int | None = None) -> nn.Module:
        from zerocomm.models import TinyGPT

        a = self.args
        return TinyGPT(vocab=a.vocab, dim=a.dim, n_layers=layers or a.layers, n_heads=a.heads,
                       seq=a.seq).to(self.device)

    def adamw(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.args.lr, weight_decay=0.1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A learnable synthetic language (as zerocomm.demo): x[t+1] = (a*x[t] + 1) % vocab."""
        if step not in self._batches:
            a = self.args
            g = torch.Generator().manual_seed(step * 1000 + self.rank)
            start = torch.randint(0, a.vocab, (a.batch, 1), generator=g)
            mul = torch.randint(1, 4, (a.batch, 1), generator=g)
            seq = [start]
            for _ in range(a.seq):
                seq.append((seq[-1] * mul + 1) % a.vocab)
            s = torch.cat(seq, dim=1).to(self.device)
            self._batches[step] = (s[:, :-1], s[:, 1:])
        return self._batches[step]

    def allreduce_grads(self, params: list[nn.Parameter]) -> None:
        """Hand-written grad all-reduce + average (one flat buffer) for (a) and (b)."""
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.world)
        for g, v in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(v)


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ---------------------------------------------------------------- variants


def run_ddp(ctx: Ctx) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = ctx.make_model()
    ddp = DDP(model, device_ids=[ctx.device.index] if ctx.cuda else None)
    opt = ctx.adamw(ddp.parameters())
    rec = Recorder(ctx.clock)
    for s in range(ctx.args.steps):
        rec.mark("start")
        loss = lm_loss(ddp, *ctx.batch(s))
        rec.mark("fwd")
        loss.backward()
        rec.mark("bwd")
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec.mark("end")
        rec.losses.append(loss.detach())
    rec.mark("start")
    out = rec.finish(ctx.args.warmup)
    out.update(opt_state_bytes=state_bytes(opt), memory=ctx.mem.peak(),
               sync_total_per_step_s=0.0, sync_exposed_per_step_s=0.0,
               note="no parameter sync: every rank steps the full model; grads all-reduced in "
                    "DDP buckets overlapped with backward")
    del ddp, opt, model
    return out


def run_zero_torch(ctx: Ctx) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = ctx.make_model()
    params = _unique_params(model)
    zro = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=ctx.args.lr,
                                  weight_decay=0.1)
    clock, sync_marks, grad_marks = ctx.clock, [], []
    orig_sync = zro._sync_params

    def timed_sync() -> None:  # step() = local step + this blocking broadcast of every shard
        a = clock.mark()
        orig_sync()
        sync_marks.append((a, clock.mark()))

    zro._sync_params = timed_sync
    rec = Recorder(clock)
    for s in range(ctx.args.steps):
        rec.mark("start")
        loss = lm_loss(model, *ctx.batch(s))
        rec.mark("fwd")
        loss.backward()
        a = clock.mark()
        ctx.allreduce_grads(params)
        grad_marks.append((a, clock.mark()))
        rec.mark("bwd")
        zro.step()
        zro.zero_grad(set_to_none=True)
        rec.mark("end")
        rec.losses.append(loss.detach())
    rec.mark("start")
    out = rec.finish(ctx.args.warmup)
    w = ctx.args.warmup
    sync = [clock.elapsed(a, b) for a, b in sync_marks][w:]
    grad = [clock.elapsed(a, b) for a, b in grad_marks][w:]
    out.update(
        opt_state_bytes=state_bytes(zro.optim), memory=ctx.mem.peak(),
        sync_per_step_s=sync, sync_total_per_step_s=statistics.mean(sync),
        sync_exposed_per_step_s=statistics.mean(sync),
        grad_sync_per_step_s=statistics.mean(grad), grad_sync_exposed_per_step_s=statistics.mean(grad),
        note="param sync = ZeroRedundancyOptimizer._sync_params() inside step(), blocking: "
             "exposed == total; grads: one flat all_reduce after backward (exposed)",
    )
    del zro, model
    return out


class SeedBcast:
    """The seed's ParamAsyncBcastHandler scheme, reduced to what this benchmark needs."""

    def __init__(self, ctx: Ctx, model: nn.Module):
        from zerocomm.partition import balanced_partition

        self.ctx, self.clock = ctx, ctx.clock
        blocks: list[tuple[str, nn.Module]] = []
        for name, child in model.named_children():  # the seed's block rule
            if isinstance(child, nn.ModuleList):
                blocks += [(f"{name}.{i}", b) for i, b in enumerate(child)]
            else:
                blocks.append((name, child))
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        block_params: list[tuple[nn.Module, list[nn.Parameter]]] = []
        for _name, blk in blocks:
            ps = [p for p in blk.parameters() if p.requires_grad]
            block_params.append((blk, ps))
            for p in ps:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        owners = balanced_partition([p.numel() for p in self.params], ctx.world)
        self.owner = {id(p): r for p, r in zip(self.params, owners)}
        self.block_ranks = {blk: sorted({self.owner[id(p)] for p in ps}) for blk, ps in block_params if ps}
        mine = [p for p in self.params if self.owner[id(p)] == ctx.rank]
        self.rank_numel = [sum(p.numel() for p in self.params if self.owner[id(p)] == r)
                           for r in range(ctx.world)]
        self.optim = ctx.adamw(mine if mine else [nn.Parameter(torch.zeros(0, device=ctx.device))])
        self.handles: dict[int, list] = {r: [] for r in range(ctx.world)}
        self.wait_marks: list[list] = []  # per step: (before, after) around Work.wait()
        self.issue: list[float] = []  # per step: host time of the first issue
        self.done: list[list[float]] = []  # per step: completion times (future callbacks)
        self.hooks = [blk.register_forward_pre_hook(self._pre_hook) for blk in self.block_ranks]

    def step(self) -> None:
        self.optim.step()
        self.wait_marks.append([])
        done: list[float] = []
        self.done.append(done)
        self.issue.append(time.perf_counter())
        for p in self.params:
            owner = self.owner[id(p)]
            work = dist.broadcast(p.data, src=owner, async_op=True)
            if not self.ctx.cuda:
                work.get_future().then(lambda _f: done.append(time.perf_counter()))
            self.handles[owner].append(work)

    def _pre_hook(self, module: nn.Module, args: object) -> None:
        pending = []
        for r in self.block_ranks[module]:
            pending.extend(self.handles[r])
            self.handles[r] = []
        if not pending:
            return
        a = self.clock.mark()
        for w in pending:
            w.wait()
        if self.wait_marks:
            self.wait_marks[-1].append((a, self.clock.mark()))

    def drain(self) -> None:
        for r in self.handles:
            for w in self.handles[r]:
                w.wait()
            self.handles[r] = []

    def blocking_sync_time(self, reps: int = 5) -> float:
        """Issue all broadcasts and wait for all of them: the sync's own duration."""
        ts = []
        for _ in range(reps):
            dist.barrier()
            a = self.clock.mark()
            works = [dist.broadcast(p.data, src=self.owner[id(p)], async_op=True) for p in self.params]
            for w in works:
                w.wait()
            b = self.clock.mark()
            self.clock.resolve()
            ts.append(self.clock.elapsed(a, b))
        return statistics.median(ts)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def run_seed_bcast(ctx: Ctx) -> dict:
    model = ctx.make_model()
    seed = SeedBcast(ctx, model)
    grad_marks = []
    rec = Recorder(ctx.clock)
    for s in range(ctx.args.steps):
        rec.mark("start")
        loss = lm_loss(model, *ctx.batch(s))
        rec.mark("fwd")
        loss.backward()
        a = ctx.clock.mark()
        ctx.allreduce_grads(seed.params)
        grad_marks.append((a, ctx.clock.mark()))
        rec.mark("bwd")
        seed.step()
        model.zero_grad(set_to_none=True)
        rec.mark("end")
        rec.losses.append(loss.detach())
    rec.mark("start")
    # the forward that consumes the last step's broadcasts
    with torch.no_grad():
        lm_loss(model, *ctx.batch(ctx.args.steps))
    seed.drain()
    out = rec.finish(ctx.args.warmup)
    w, el = ctx.args.warmup, ctx.clock.elapsed
    # step i's broadcasts are waited for in forward i+1 (hooks append to the newest list)
    exposed = [sum(el(a, b) for a, b in marks) for marks in seed.wait_marks][w:]
    blocking = seed.blocking_sync_time()
    if ctx.cuda:
        total = [blocking] * len(exposed)
        total_kind = "blocking re-measurement (issue all, wait all), CUDA events"
    else:
        total = [max(d) - t0 for t0, d in zip(seed.issue, seed.done) if d][w:]
        total_kind = "first issue -> last completion (gloo future callbacks), per step"
    grad = [el(a, b) for a, b in grad_marks][w:]
    out.update(
        opt_state_bytes=state_bytes(seed.optim), memory=ctx.mem.peak(),
        owner_numel=seed.rank_numel,
        sync_per_step_s=total, sync_total_per_step_s=statistics.mean(total),
        sync_exposed_per_step_s=statistics.mean(exposed), exposed_per_step_s=exposed,
        sync_blocking_remeasured_s=blocking, sync_total_kind=total_kind,
        grad_sync_per_step_s=statistics.mean(grad), grad_sync_exposed_per_step_s=statistics.mean(grad),
        note="exposed = time inside Work.wait() in the block pre-hooks"
             + (" (CUDA events around the host call: the stream stall, approximately)" if ctx.cuda else ""),
    )
    seed.remove()
    del seed, model
    return out


def _bucket_block_names(zopt) -> dict[str, str]:
    """scheduler label -> readable name ('grad:dense:3' -> 'grad:blocks.2')."""
    names = {}
    for u in zopt.sync.units:
        plan = u.plan
        for b in plan.buckets:
            first, last = plan.blocks[b.blocks[0]].name, plan.blocks[b.blocks[-1]].name
            nm = first if first == last else f"{first}..{last}"
            names[f"grad:{u.name}:{b.index}"] = f"grad:{nm}"
    return names


def _wait_call_us(spans: list) -> dict:
    ds = sorted(s.duration * 1e6 for s in spans if s.lane == "wait" and not s.label.startswith("grad"))
    if not ds:
        return {}
    return {"min": ds[0], "p10": ds[len(ds) // 10], "median": ds[len(ds) // 2], "n": len(ds)}


def exposed_by_block(spans: list, gens: int) -> dict[str, float]:
    """Param waits per step attributed to the block whose pre-hook waited (the wait
    starts inside that block's compute span), in forward order."""
    blocks = [s for s in spans if s.lane == "compute" and s.label not in ("backward", "zopt.step()")]
    out: dict[str, float] = {}
    for blk in blocks:  # forward order of first appearance
        out.setdefault(blk.label, 0.0)
    for w in spans:
        if w.lane != "wait" or w.label.startswith("grad") or w.label == "synchronize":
            continue
        owner = [b for b in blocks if b.start <= w.start <= b.end]
        label = max(owner, key=lambda b: b.start).label if owner else "?"
        out[label] = out.get(label, 0.0) + w.duration / gens
    return out


def run_zerocomm(ctx: Ctx, mode: str, transport, tag: str, layers: int | None = None,
                 keep_trace: bool = True, steps: int | None = None) -> dict:
    import zerocomm

    model = ctx.make_model(layers)
    opt = ctx.adamw(model.parameters())
    zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=ctx.args.bucket_mb, transport=transport,
                           group=ctx.group)
    sched = zopt.sync.units[0].sched
    a = ctx.args
    n_steps = steps or a.steps
    rec = Recorder(ctx.clock)
    for s in range(n_steps):
        rec.mark("start")
        loss = lm_loss(model, *ctx.batch(s))
        rec.mark("fwd")
        i = sched.trace_begin("compute", "backward")
        loss.backward()
        sched.trace_end(i)
        rec.mark("bwd")
        if s == a.warmup - 1:
            # From the last warm-up step's launch on: every traced launch is
            # consumed by a traced forward (the extra one below takes the last).
            zopt.enable_tracing()
        i = sched.trace_begin("compute", "zopt.step()")
        zopt.step()
        sched.trace_end(i)
        zopt.zero_grad()
        rec.mark("end")
        rec.losses.append(loss.detach())
    rec.mark("start")
    with torch.no_grad():  # the forward that waits for the last step's sync
        lm_loss(model, *ctx.batch(n_steps))
    stats = zopt.stats()
    spans = zopt.trace()
    out = rec.finish(a.warmup)
    gens = n_steps - a.warmup + 1  # launches traced
    measured = n_steps - a.warmup
    plan = zopt.plan
    buf_bytes = sum(f.numel() * f.element_size() for u in zopt.sync.units for f in u.flats)
    buf_bytes += sum(f.numel() * f.element_size() for fl in zopt._grad_flats for f in fl)
    buf_bytes += sum(f.numel() * f.element_size() for fl in zopt._grad_shards for f in fl if f is not None)
    waits_by_bucket = {k: v / gens for k, v in stats["wait_by_bucket_s"].items()}
    out.update(
        opt_state_bytes=state_bytes(zopt.optim), memory=ctx.mem.peak(),
        zerocomm_buffer_bytes=buf_bytes,
        sync_total_s=stats["sync_total_s"], sync_exposed_s=stats["sync_exposed_s"],
        exposed_fraction=stats["exposed_fraction"], traced_syncs=gens,
        sync_total_per_step_s=stats["sync_total_s"] / gens,
        sync_exposed_per_step_s=stats["sync_exposed_s"] / gens,
        grad_reduce_per_step_s=stats["grad_reduce_total_s"] / measured,
        grad_wait_per_step_s=stats["grad_wait_s"] / gens,
        bucket_sync_median_s={k: v["median_s"] for k, v in stats["buckets"].items()},
        wait_per_step_by_bucket_s=waits_by_bucket,
        exposed_per_step_by_block_s=exposed_by_block(spans, gens),
        # wait-lane span durations (C++ wait_param only, without the Python hook around it):
        # the small ones are waits whose bucket had already arrived
        wait_span_us=_wait_call_us(spans),
        n_buckets=len(plan.buckets), bucket_order=[plan.buckets[i].index for i in zopt.sync.units[0].order],
        plan_rank_numel=plan.rank_numel, transport=sched.transport,
        note="sync_total: param buckets on the comm lane; exposed: compute waiting for them "
             "(zopt.stats()); per step = over the traced launches",
    )
    if keep_trace and ctx.rank == 0:
        path = Path(a.out) / f"overlap_trace_{tag}_{a.device}.json"
        zopt.export_chrome_trace(str(path))
        out["chrome_trace"] = str(path)
        names = _bucket_block_names(zopt)
        out["spans"] = [(s.lane, names.get(s.label, s.label), s.start, s.end) for s in spans]
    zopt.close()
    del zopt, opt, model
    return out


def run_sim_blocking(ctx: Ctx, sync_s: float) -> dict:
    model = ctx.make_model()
    opt = ctx.adamw(model.parameters())
    rec = Recorder(ctx.clock)
    slept = []
    for s in range(ctx.args.steps):
        rec.mark("start")
        loss = lm_loss(model, *ctx.batch(s))
        rec.mark("fwd")
        loss.backward()
        rec.mark("bwd")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctx.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        time.sleep(sync_s)  # the modelled param sync, done synchronously
        slept.append(time.perf_counter() - t0)
        rec.mark("end")
        rec.losses.append(loss.detach())
    rec.mark("start")
    out = rec.finish(ctx.args.warmup)
    slept = slept[ctx.args.warmup:]
    out.update(opt_state_bytes=state_bytes(opt), memory=ctx.mem.peak(),
               sync_total_per_step_s=statistics.mean(slept), sync_exposed_per_step_s=statistics.mean(slept),
               exposed_fraction=1.0, modelled_sync_s=sync_s,
               note="unsharded AdamW; the modelled param-sync time slept after the step (exposed == total); "
                    "no grad reduction modelled")
    del opt, model
    return out


# ---------------------------------------------------------------- simulated setup


def measure_forward(ctx: Ctx, layers: int | None = None, reps: int = 8) -> float:
    model = ctx.make_model(layers)
    ts = []
    for s in range(reps):
        a = ctx.clock.mark()
        loss = lm_loss(model, *ctx.batch(s))
        b = ctx.clock.mark()
        ctx.clock.resolve()
        ts.append(ctx.clock.elapsed(a, b))
        del loss
    del model
    return _allreduce_mean(ctx, statistics.median(ts[2:]))[0]  # every rank models the same network


def modelled_sync(ctx: Ctx, mode: str, bw_gbps: float, layers: int | None = None) -> dict:
    """What SimulatedCommunicator will charge for one step's param sync of `mode`."""
    from zerocomm.partition import build_plan

    a = ctx.args
    model = ctx.make_model(layers)
    plan = build_plan(model, mode=mode, world_size=1, bucket_mb=a.bucket_mb)
    factor = 1.0 if mode == "broadcast" else (a.sim_world - 1) / a.sim_world
    nbytes = sum(b.nbytes for b in plan.buckets)
    lat = a.sim_latency_us * 1e-6
    return {"bytes": nbytes, "n_buckets": len(plan.buckets), "factor": factor,
            "sync_s": len(plan.buckets) * lat + factor * nbytes / (bw_gbps * 1e9)}


def calibrate_bandwidth(ctx: Ctx, mode: str, fwd_s: float, layers: int | None = None) -> float:
    m = modelled_sync(ctx, mode, 1.0, layers)
    budget = fwd_s - m["n_buckets"] * ctx.args.sim_latency_us * 1e-6
    if budget <= 0:
        raise SystemExit(f"--sim-latency-us too large: {m['n_buckets']} buckets' latency exceeds the forward pass")
    return m["factor"] * m["bytes"] / budget / 1e9


def warm_process(ctx: Ctx) -> None:
    """One-time costs (imports, allocator, autograd and gloo set-up) paid before any
    variant, so the first variant's peak-memory increment is not inflated by them."""
    import zerocomm  # noqa: F401
    from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401

    model = ctx.make_model()
    opt = ctx.adamw(model.parameters())
    for s in range(2):
        lm_loss(model, *ctx.batch(s)).backward()
        ctx.allreduce_grads(_unique_params(model))
        opt.step()
        opt.zero_grad()
    del model, opt
    ctx.clock.resolve()


def _allreduce_mean(ctx: Ctx, *xs: float) -> list[float]:
    t = torch.tensor(xs, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, group=ctx.group)
    return (t / ctx.group_size).tolist()


def sim_setup(ctx: Ctx, mode: str, fwd_s: float, layers: int | None = None) -> dict:
    """Simulated bandwidth for `mode`. --auto-sim: first guess from the bare forward
    time, then one short probe run corrects for what the model leaves out (copy-in/out
    on the comm worker, sleep overshoot, CPU contention, the forward slowing down
    next to the worker) so that the measured sync per step ~= the measured forward
    compute (forward minus its waits) of a zerocomm run."""
    from zerocomm.transport import SimulatedTransport

    a = ctx.args
    if not a.auto_sim:
        return {"bandwidth_gbps": a.sim_bandwidth_gbps, **modelled_sync(ctx, mode, a.sim_bandwidth_gbps, layers)}
    bw0 = calibrate_bandwidth(ctx, mode, fwd_s, layers)
    m0 = modelled_sync(ctx, mode, bw0, layers)
    tr = SimulatedTransport(a.sim_latency_us, bw0, a.sim_world)
    probe = run_zerocomm(ctx, mode, tr, "probe", layers=layers, keep_trace=False, steps=a.warmup + 4)
    fwd_compute = statistics.median(probe["forward_s"]) - probe["sync_exposed_per_step_s"]
    overhead = probe["sync_total_per_step_s"] - m0["sync_s"]
    fwd_compute, overhead = _allreduce_mean(ctx, fwd_compute, overhead)
    budget = fwd_compute - overhead - m0["n_buckets"] * a.sim_latency_us * 1e-6
    bw = m0["factor"] * m0["bytes"] / budget / 1e9 if budget > 0 else bw0
    return {"bandwidth_gbps": bw, "first_guess_gbps": bw0, "probe_sync_s": probe["sync_total_per_step_s"],
            "probe_forward_compute_s": fwd_compute, "probe_unmodelled_overhead_s": overhead,
            **modelled_sync(ctx, mode, bw, layers)}


def _log_sim(log, v: str, r: dict, secs: float) -> None:
    fc = statistics.median(r["forward_s"]) - (0 if v == "sim_blocking" else r["sync_exposed_per_step_s"])
    log(f"  {v:18s} step {statistics.median(r['step_s']) * 1e3:7.1f} ms   "
        f"sync/step {r['sync_total_per_step_s'] * 1e3:6.1f} ms (forward compute {fc * 1e3:.1f} ms), exposed "
        f"{r['sync_exposed_per_step_s'] * 1e3:6.1f} ms "
        f"({r['sync_exposed_per_step_s'] / r['sync_total_per_step_s']:.1%})   ({secs:.0f} s)")


# ---------------------------------------------------------------- driver


def run_all(rank: int, world: int, args: argparse.Namespace, device: torch.device, t_start: float) -> None:
    from zerocomm.transport import SimulatedTransport

    ctx = Ctx(args, rank, world, device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    wanted = set(args.variants.split(",")) if args.variants else set(REAL_VARIANTS + SIM_VARIANTS)
    real = [v for v in REAL_VARIANTS if v in wanted] if args.transport in ("all", "real") else []
    sim = [v for v in SIM_VARIANTS if v in wanted] if args.transport in ("all", "simulated") else []
    log = (lambda *m: print(*m, flush=True)) if rank == 0 else (lambda *m: None)
    model = ctx.make_model()
    n_params = sum(p.numel() for p in _unique_params(model))
    del model
    log(f"TinyGPT dim={args.dim} layers={args.layers} heads={args.heads} seq={args.seq} vocab={args.vocab} "
        f"batch={args.batch}/rank: {n_params:,} params ({n_params * 4 / 2**20:.1f} MiB fp32); "
        f"{world} rank(s) on {device.type}; {args.steps} steps/variant ({args.warmup} warm-up)")
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    runners = {"ddp": run_ddp, "zero_torch": run_zero_torch, "seed_bcast": run_seed_bcast,
               "zc_broadcast": lambda c: run_zerocomm(c, "broadcast", "auto", "zc_broadcast"),
               "zc_allgather": lambda c: run_zerocomm(c, "allgather", "auto", "zc_allgather")}
    warm_process(ctx)
    for v in real:
        dist.barrier()
        t0 = time.perf_counter()
        ctx.mem.reset()
        results[v] = runners[v](ctx)
        timings[v] = time.perf_counter() - t0
        log(f"  {v:18s} step {statistics.median(results[v]['step_s']) * 1e3:7.1f} ms   "
            f"sync/step {results[v]['sync_total_per_step_s'] * 1e3:6.1f} ms, exposed "
            f"{results[v]['sync_exposed_per_step_s'] * 1e3:6.1f} ms   ({timings[v]:.0f} s)")
    sim_cfg: dict = {}
    sim_ranks = list(range(world)) if args.sim_ranks == "all" else [0]
    sim_group = dist.new_group(sim_ranks) if sim and len(sim_ranks) < world else None
    if sim and rank in sim_ranks:
        ctx.group, ctx.group_size = sim_group, len(sim_ranks)
        barrier = lambda: dist.barrier(group=sim_group)  # noqa: E731
        barrier()
        t0 = time.perf_counter()
        fwd = measure_forward(ctx)
        sim_cfg = {"forward_s": fwd, "latency_us": args.sim_latency_us, "modelled_world": args.sim_world,
                   "ranks": sim_ranks,
                   "auto": args.auto_sim, "modes": {}}
        for mode in ("broadcast", "allgather"):
            sim_cfg["modes"][mode] = sim_setup(ctx, mode, fwd)
        timings["sim_calibration"] = time.perf_counter() - t0
        log(f"simulated transport: forward {fwd * 1e3:.1f} ms (no hooks); "
            + ", ".join(f"{m} {c['bandwidth_gbps']:.3f} GB/s -> modelled sync {c['sync_s'] * 1e3:.1f} ms "
                        f"({c['n_buckets']} buckets)" for m, c in sim_cfg["modes"].items())
            + f"  ({timings['sim_calibration']:.0f} s)")
        # zerocomm first: the blocking baseline then sleeps what zerocomm's sync really took
        for v in sorted(sim, key=lambda v: v == "sim_blocking"):
            barrier()
            t0 = time.perf_counter()
            ctx.mem.reset()
            if v == "sim_blocking":
                if "sim_zc_allgather" in results:
                    sync_s = _allreduce_mean(ctx, results["sim_zc_allgather"]["sync_total_per_step_s"])[0]
                else:
                    sync_s = sim_cfg["modes"]["allgather"]["sync_s"]
                results[v] = run_sim_blocking(ctx, sync_s)
            else:
                mode = v.rsplit("_", 1)[1]
                c = sim_cfg["modes"][mode]
                tr = SimulatedTransport(args.sim_latency_us, c["bandwidth_gbps"], args.sim_world)
                results[v] = run_zerocomm(ctx, mode, tr, v)
            timings[v] = time.perf_counter() - t0
            _log_sim(log, v, results[v], timings[v])
        if args.sim_extra_layers:
            L = args.sim_extra_layers
            barrier()
            t0 = time.perf_counter()
            fwd_l = measure_forward(ctx, L)
            c = sim_setup(ctx, "allgather", fwd_l, L)
            tr = SimulatedTransport(args.sim_latency_us, c["bandwidth_gbps"], args.sim_world)
            v = f"sim_zc_allgather_{L}layers"
            ctx.mem.reset()
            results[v] = run_zerocomm(ctx, "allgather", tr, v, layers=L, keep_trace=False)
            results[v].update(layers=L, bare_forward_s=fwd_l, sim=c)
            timings[v] = time.perf_counter() - t0
            _log_sim(log, v, results[v], timings[v])

        ctx.group, ctx.group_size = None, world
    dist.barrier()

    # -- gather every rank's figures on rank 0
    mine = {v: {k: x for k, x in r.items() if k != "spans"} for v, r in results.items()}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return
    report = build_report(args, world, device, n_params, results, gathered, sim_cfg, timings, t_start)
    out = Path(args.out)
    jpath = out / f"overlap_{args.device}.json"
    jpath.write_text(json.dumps(report, indent=1, default=float))
    plot_bars(report, out / f"overlap_{args.device}.png")
    timeline = {v: results[v]["spans"] for v in ("sim_zc_allgather", "zc_allgather", "sim_zc_broadcast",
                                                 "zc_broadcast") if v in results and "spans" in results[v]}
    if timeline:
        plot_timeline(report, timeline, out / f"overlap_timeline_{args.device}.png")
    print_summary(report)
    print(f"wrote {jpath}, {out / f'overlap_{args.device}.png'}"
          + (f", {out / f'overlap_timeline_{args.device}.png'}" if timeline else ""), flush=True)


def build_report(args, world, device, n_params, results, gathered, sim_cfg, timings, t_start) -> dict:
    variants = {}
    for v, r in results.items():
        per_rank = [g[v] for g in gathered if v in g]
        agg = {
            "step_time_s": quantiles(r["step_s"]),  # rank 0's steps (ranks are in lock-step)
            "step_time_median_per_rank_s": [statistics.median(p["step_s"]) for p in per_rank],
            "forward_median_s": statistics.median(r["forward_s"]),
            "backward_median_s": statistics.median(r["backward_s"]),
            "optimizer_median_s": statistics.median(r["optimizer_s"]),
            "sync_total_per_step_s": statistics.mean(p["sync_total_per_step_s"] for p in per_rank),
            "sync_exposed_per_step_s": statistics.mean(p["sync_exposed_per_step_s"] for p in per_rank),
            "opt_state_bytes_per_rank": [p["opt_state_bytes"] for p in per_rank],
            "peak_memory_bytes_per_rank": [p["memory"]["peak_bytes"] for p in per_rank],
            "memory_before_variant_bytes_per_rank": [p["memory"]["base_bytes"] for p in per_rank],
            "memory_kind": r["memory"]["kind"],
            "peak_increment_bytes_per_rank": [p["memory"]["peak_bytes"] - p["memory"]["base_bytes"]
                                              for p in per_rank],
            "final_loss_rank0": r["losses"][-1] if r["losses"] else None,
        }
        n = len(r["step_s"])
        agg["sync_total_measured_s"] = agg["sync_total_per_step_s"] * n
        agg["sync_exposed_measured_s"] = agg["sync_exposed_per_step_s"] * n
        agg["sync_hidden_per_step_s"] = max(0.0, agg["sync_total_per_step_s"] - agg["sync_exposed_per_step_s"])
        agg["exposed_fraction"] = (agg["sync_exposed_per_step_s"] / agg["sync_total_per_step_s"]
                                   if agg["sync_total_per_step_s"] else None)
        variants[v] = {"summary": agg, "per_rank": per_rank}
    acceptance = {}
    if "sim_blocking" in variants:
        blk = variants["sim_blocking"]["summary"]
        acceptance["blocking_exposed_fraction"] = blk["exposed_fraction"]
    for v in [k for k in variants if k.startswith("sim_zc_")]:
        if v in variants:
            s = variants[v]["summary"]
            fwd = sim_cfg.get("forward_s")
            worst_rank = max(p["sync_exposed_per_step_s"] / p["sync_total_per_step_s"]
                             for p in variants[v]["per_rank"])
            # the embedding and the first transformer block can only overlap with the
            # embedding's forward: their waits are the inherent part of the exposure
            r0 = variants[v]["per_rank"][0]
            by_block = r0["exposed_per_step_by_block_s"]
            names = list(by_block)
            k = next((i for i, n in enumerate(names) if n.startswith("blocks.")), len(names) - 1)
            first2 = sum(by_block[n] for n in names[:k + 1])
            fwd = r0.get("bare_forward_s", sim_cfg.get("forward_s"))
            acceptance[v] = {
                "sync_total_per_step_s": s["sync_total_per_step_s"],
                "sync_exposed_per_step_s": s["sync_exposed_per_step_s"],
                "exposed_fraction": s["exposed_fraction"],
                "exposed_fraction_worst_rank": worst_rank,
                "sync_over_forward": s["sync_total_per_step_s"] / fwd if fwd else None,
                "sync_over_forward_compute": s["sync_total_per_step_s"] / (
                    s["forward_median_s"] - s["sync_exposed_per_step_s"]),
                "exposed_up_to_first_block_per_step_s_rank0": first2,
                "exposed_by_block_per_step_s_rank0": by_block,
                "exposed_rest_per_step_s_rank0": r0["sync_exposed_per_step_s"] - first2,
                "pass": s["exposed_fraction"] is not None and s["exposed_fraction"] <= ACCEPT_FRACTION,
                "step_time_vs_blocking": (s["step_time_s"]["median"] / variants["sim_blocking"]["summary"]["step_time_s"]["median"]
                                          if "sim_blocking" in variants else None),
            }
    if acceptance:
        acceptance["criterion"] = (f"simulated sync ~= forward: zerocomm exposed <= {ACCEPT_FRACTION:.0%} of its "
                                   "total sync; blocking baseline exposes 100%")
    losses = {v: variants[v]["summary"]["final_loss_rank0"] for v in REAL_VARIANTS if v in variants}
    return {
        "benchmark": "overlap",
        "machine": machine_info(device.type),
        "config": {**vars(args), "world_size": world, "n_params": n_params,
                   "param_bytes": n_params * 4},
        "variants": variants,
        "simulated": sim_cfg,
        "acceptance": acceptance,
        "final_loss_rank0_real": losses,
        "run_time_s": {**timings, "total": time.time() - t_start},
    }


def print_summary(rep: dict) -> None:
    print("\n=== overlap benchmark", rep["machine"]["device_name"], "| world", rep["config"]["world_size"])
    hdr = f"{'variant':22s} {'step ms (IQR)':>17s} {'fwd':>6s} {'bwd':>6s} {'opt':>6s} {'sync/step':>9s} " \
          f"{'exposed':>8s} {'exp%':>5s} {'opt state MiB':>14s} {'peak(+incr) MiB':>20s}"
    print(hdr)
    for v, d in rep["variants"].items():
        s = d["summary"]
        st = s["step_time_s"]
        frac = f"{s['exposed_fraction']:.0%}" if s["exposed_fraction"] is not None else "-"
        print(f"{v:22s} {st['median'] * 1e3:8.1f} ({st['iqr'] * 1e3:5.1f})  {s['forward_median_s'] * 1e3:6.1f} "
              f"{s['backward_median_s'] * 1e3:6.1f} {s['optimizer_median_s'] * 1e3:6.1f} "
              f"{s['sync_total_per_step_s'] * 1e3:9.1f} {s['sync_exposed_per_step_s'] * 1e3:8.1f} {frac:>5s} "
              f"{'/'.join(f'{b / 2**20:.1f}' for b in s['opt_state_bytes_per_rank']):>14s} "
              f"{'/'.join(f'{b / 2**20:.0f}(+{i / 2**20:.0f})' for b, i in zip(s['peak_memory_bytes_per_rank'], s['peak_increment_bytes_per_rank'])):>20s}")
    acc = rep.get("acceptance")
    if acc:
        print("\nacceptance:", acc["criterion"])
        if "blocking_exposed_fraction" in acc:
            print(f"  blocking baseline: exposed {acc['blocking_exposed_fraction']:.0%} of its sync")
        for v in [k for k in acc if k.startswith("sim_zc_")]:
            if v in acc:
                a = acc[v]
                print(f"  {v}: sync {a['sync_total_per_step_s'] * 1e3:.1f} ms/step "
                      f"({a['sync_over_forward']:.2f}x the bare forward, {a['sync_over_forward_compute']:.2f}x "
                      f"the in-run forward compute), exposed {a['sync_exposed_per_step_s'] * 1e3:.1f} ms "
                      f"= {a['exposed_fraction']:.1%} (worst rank {a['exposed_fraction_worst_rank']:.1%}) -> "
                      f"{'PASS' if a['pass'] else 'MISS'}; embedding + first block waited "
                      f"{a['exposed_up_to_first_block_per_step_s_rank0'] * 1e3:.1f} ms, all later blocks "
                      f"{a['exposed_rest_per_step_s_rank0'] * 1e3:.1f} ms (rank 0)")
    losses = rep.get("final_loss_rank0_real") or {}
    if losses:
        print("final loss (rank 0, same data and init; should agree across variants):",
              ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    print("run time:", ", ".join(f"{k} {v:.0f}s" for k, v in rep["run_time_s"].items()))


# ---------------------------------------------------------------- plots


def plot_bars(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("real transport (" + ("gloo" if rep["config"]["device"] == "cpu" else "NCCL") +
               f", {rep['config']['world_size']} ranks)", REAL_VARIANTS),
              ("simulated transport (sync ~= forward" if rep["simulated"].get("auto") else
               "simulated transport (", SIM_VARIANTS)]
    groups = [(t, [v for v in vs if v in rep["variants"]]) for t, vs in groups]
    groups = [(t, vs) for t, vs in groups if vs]
    if rep["simulated"]:
        sc = rep["simulated"]
        bws = ", ".join(f"{m} {c['bandwidth_gbps']:.2f} GB/s" for m, c in sc["modes"].items())
        groups = [(t + (f", {bws}, W={sc['modelled_world']}, lat {sc['latency_us']:g} us)"
                        if t.startswith("simulated") else ""), vs) for t, vs in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(7.5 * len(groups), 5.6), squeeze=False)
    for ax, (title, vs) in zip(axes[0], groups):
        xs = range(len(vs))
        w = 0.38
        med = [rep["variants"][v]["summary"]["step_time_s"]["median"] * 1e3 for v in vs]
        lo = [(rep["variants"][v]["summary"]["step_time_s"]["median"] - rep["variants"][v]["summary"]["step_time_s"]["q25"]) * 1e3 for v in vs]
        hi = [(rep["variants"][v]["summary"]["step_time_s"]["q75"] - rep["variants"][v]["summary"]["step_time_s"]["median"]) * 1e3 for v in vs]
        exp_ = [rep["variants"][v]["summary"]["sync_exposed_per_step_s"] * 1e3 for v in vs]
        hid = [rep["variants"][v]["summary"]["sync_hidden_per_step_s"] * 1e3 for v in vs]
        ax.bar([x - w / 2 for x in xs], med, w, yerr=[lo, hi], capsize=3, color="#4c72b0",
               label="step time (median, IQR)")
        ax.bar([x + w / 2 for x in xs], exp_, w, color="#dd5555", label="param sync: exposed (compute waited)")
        ax.bar([x + w / 2 for x in xs], hid, w, bottom=exp_, color="#7fbf7f", label="param sync: hidden (overlapped)")
        for x, m, e, h in zip(xs, med, exp_, hid):
            ax.text(x - w / 2, m, f"{m:.0f}", ha="center", va="bottom", fontsize=8)
            tot = e + h
            if tot > 0:
                ax.text(x + w / 2, tot, f"{tot:.0f}\n({e / tot:.0%} exp.)", ha="center", va="bottom", fontsize=7)
            else:
                ax.text(x + w / 2, 0, "none", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([LABELS.get(v, v) for v in vs], fontsize=8)
        ax.set_ylabel("ms per step")
        ax.set_title(title, fontsize=9)
        ymax = max(max(med), max(e + h for e, h in zip(exp_, hid)))
        ax.set_ylim(0, ymax * 1.25)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    m = rep["machine"]
    fig.suptitle(f"ZeRO-1 param-sync overlap: TinyGPT {rep['config']['n_params'] / 1e6:.1f}M params, "
                 f"{m['device_name']}, torch {m['torch_version']}, {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pick_step(spans: list) -> tuple[float, float]:
    """Window of one steady-state step: from the start of one zopt.step() to the end of the next."""
    steps = [s for s in spans if s[0] == "compute" and s[1] == "zopt.step()"]
    if len(steps) >= 3:
        k = len(steps) // 2
        return steps[k - 1][2], steps[k][3]
    return min(s[2] for s in spans), max(s[3] for s in spans)


def _short(label: str) -> str:
    if label.startswith("grad:"):
        return label
    if label.startswith(("dense:", "expert:")) and "[" in label:
        return label[label.index("[") + 1:].rstrip("]")
    return label.replace("blocks.", "b")


def plot_timeline(rep: dict, timelines: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(timelines)[:2]
    fig, axes = plt.subplots(len(keys), 1, figsize=(17, 3.4 * len(keys)), squeeze=False)
    lanes = ["compute", "wait", "comm"]
    colors = {"compute": "#4c72b0", "wait": "#dd5555", "comm": "#55a868", "grad": "#c4ad66", "step": "#8172b2"}
    for ax, key in zip(axes[:, 0], keys):
        spans = timelines[key]
        t0, t1 = _pick_step(spans)
        sel = [s for s in spans if s[3] > t0 and s[2] < t1 and s[0] in lanes]
        waits = [s for s in sel if s[0] == "wait"]
        for lane, label, a, b in sel:
            y = 2 - lanes.index(lane)
            if lane == "compute" and label not in ("backward", "zopt.step()"):
                # the block span opens before its pre-hook waits: draw the compute after the wait
                a = max([a] + [w[3] for w in waits if a <= w[2] <= b])
            a, b = max(a, t0), min(b, t1)
            if b <= a:
                continue
            c = colors["grad"] if label.startswith("grad") else colors["step"] if label in (
                "backward", "zopt.step()") else colors[lane]
            x, wd = (a - t0) * 1e3, (b - a) * 1e3
            ax.broken_barh([(x, max(wd, 0.05))], (y - 0.38, 0.76), facecolors=c, edgecolors="black", linewidth=0.4)
        # labels after bars, staggered where bars are narrow
        span_ms = (t1 - t0) * 1e3
        for lane, label, a, b in sel:
            y = 2 - lanes.index(lane)
            if lane == "compute" and label not in ("backward", "zopt.step()"):
                a = max([a] + [w[3] for w in waits if a <= w[2] <= b])
            a, b = max(a, t0), min(b, t1)
            if b <= a:
                continue
            x, wd = (a - t0) * 1e3, (b - a) * 1e3
            txt = _short(label)
            if lane == "wait":
                if wd < span_ms * 0.004:
                    continue
                txt = f"{txt} {wd:.1f}ms"
            fs = 7
            if wd > span_ms * 0.012 * len(txt) / 4:
                ax.text(x + wd / 2, y, txt, ha="center", va="center", fontsize=fs, color="white" if lane != "wait" else "black")
            else:
                ax.text(x + wd / 2, y + 0.42, txt, ha="left", va="bottom", fontsize=6, rotation=35)
        if ax is axes[0, 0]:
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(color=colors["compute"], label="block forward"),
                               Patch(color=colors["step"], label="backward / zopt.step()"),
                               Patch(color=colors["wait"], label="forward waits for params (exposed)"),
                               Patch(color=colors["comm"], label="param sync bucket"),
                               Patch(color=colors["grad"], label="grad reduction / step waits for it")],
                      fontsize=7, loc="upper right", ncol=5)
        ax.set_yticks([2, 1, 0])
        ax.set_yticklabels(["compute\n(block fwd, bwd, step)", "wait\n(fwd waits for params)", "comm\n(param / grad buckets)"],
                           fontsize=8)
        ax.set_ylim(-0.6, 3.1)
        ax.set_xlim(0, span_ms)
        ax.set_xlabel("time (ms) from the start of step k's zopt.step()")
        s = rep["variants"].get(key, {}).get("summary", {})
        extra = ""
        if s:
            extra = (f": param sync {s['sync_total_per_step_s'] * 1e3:.1f} ms/step, exposed "
                     f"{s['sync_exposed_per_step_s'] * 1e3:.1f} ms ({s['exposed_fraction']:.0%}), rank 0")
        ax.set_title(f"{key}{extra}: one step (zopt.step() k -> forward, backward, zopt.step() k+1)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- entry points


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace, t_start: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_all(rank, world, args, torch.device("cpu"), t_start)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    t_start = time.time()
    args = parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        if "RANK" not in os.environ:  # plain python: a one-rank group
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
        try:
            run_all(dist.get_rank(), dist.get_world_size(), args, device, t_start)
        finally:
            dist.destroy_process_group()
        return
    if "RANK" in os.environ:  # torchrun on CPU
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        try:
            run_all(dist.get_rank(), dist.get_world_size(), args, torch.device("cpu"), t_start)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(args.world_size, port, args, t_start), nprocs=args.world_size,
                       start_method="spawn")
    print(f"total wall time {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
