"""What one rank runs: every selected variant in turn (ranks in lock-step), then
the figures gathered on rank 0, which writes the JSON, the plots and the table."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .cli import REAL_VARIANTS, SIM_VARIANTS
from .context import Ctx, allreduce_mean, lm_loss, unique_params
from .plots import SpanRow, plot_bars, plot_timeline
from .report import build_report, print_summary
from .runners.loop import Schedule, run_alone, run_rounds
from .runners.seed import make_seed_bcast
from .runners.simulated import make_sim_blocking, measure_forward, sim_setup
from .runners.torch_baselines import make_ddp, make_zero_torch
from .runners.variant import Variant
from .runners.zerocomm_runs import make_zerocomm

Log = Callable[..., None]


def warm_process(ctx: Ctx) -> None:
    """One-time costs (imports, allocator, autograd and gloo set-up) paid before any
    variant, so the first variant's peak-memory increment is not inflated by them."""
    from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401

    import zerocomm  # noqa: F401

    model = ctx.make_model()
    opt = ctx.adamw(model.parameters())
    for s in range(2):
        lm_loss(model, *ctx.batch(s)).backward()
        ctx.allreduce_grads(unique_params(model))
        opt.step()
        opt.zero_grad()
    del model, opt
    ctx.clock.resolve()


def _log_sim(log: Log, v: str, r: dict[str, Any], secs: float) -> None:
    fc = statistics.median(r["forward_s"]) - (0 if v == "sim_blocking" else r["sync_exposed_per_step_s"])
    log(
        f"  {v:18s} step {statistics.median(r['step_s']) * 1e3:7.1f} ms   "
        f"sync/step {r['sync_total_per_step_s'] * 1e3:6.1f} ms (forward compute {fc * 1e3:.1f} ms), exposed "
        f"{r['sync_exposed_per_step_s'] * 1e3:6.1f} ms "
        f"({r['sync_exposed_per_step_s'] / r['sync_total_per_step_s']:.1%})   ({secs:.0f} s)"
    )


def _deepspeed() -> Any:
    from .runners import deepspeed_runs  # imports deepspeed only when its variants run

    return deepspeed_runs


def _run_real(
    ctx: Ctx, variants: list[str], results: dict[str, dict[str, Any]], timings: dict[str, float], log: Log
) -> None:
    """The real-transport variants, every rank in each, in interleaved rounds."""
    makers: dict[str, Callable[[Ctx], Variant]] = {
        "ddp": make_ddp,
        "zero_torch": make_zero_torch,
        "seed_bcast": make_seed_bcast,
        "zc_broadcast": lambda c: make_zerocomm(c, "broadcast", "auto", "zc_broadcast"),
        "zc_allgather": lambda c: make_zerocomm(c, "allgather", "auto", "zc_allgather"),
        "ds_zero1": lambda c: _deepspeed().make_deepspeed(c, 1),
        "ds_zero2": lambda c: _deepspeed().make_deepspeed(c, 2),
    }
    if not variants:
        return
    a = ctx.args
    dist.barrier()
    t0 = time.perf_counter()
    built = [makers[v](ctx) for v in variants]
    sched = Schedule.interleaved(a.steps, a.round_steps, a.warmup)
    results.update(run_rounds(ctx, built, sched))
    timings["real"] = time.perf_counter() - t0
    log(
        f"  {len(sched.rounds)} interleaved rounds of {a.round_steps} steps per variant, "
        f"{len(sched.measured)} measured  ({timings['real']:.0f} s)"
    )
    for v in variants:
        r = results[v]
        log(
            f"  {v:18s} step {statistics.median(r['step_s']) * 1e3:7.1f} ms   "
            f"sync/step {r['sync_total_per_step_s'] * 1e3:6.1f} ms, exposed "
            f"{r['sync_exposed_per_step_s'] * 1e3:6.1f} ms"
        )


def _run_simulated(
    ctx: Ctx,
    variants: list[str],
    sim_ranks: list[int],
    sim_group: dist.ProcessGroup | None,
    results: dict[str, dict[str, Any]],
    timings: dict[str, float],
    log: Log,
) -> dict[str, Any]:
    """Calibrate the simulated transport, then the simulated variants, on the ranks in
    sim_ranks only (sim_group: None when that is every rank). Returns the calibration."""
    from zerocomm.transport import SimulatedTransport

    args = ctx.args
    ctx.group, ctx.group_size, ctx.bucket_mb = sim_group, len(sim_ranks), args.sim_bucket_mb
    barrier = lambda: dist.barrier(group=sim_group)  # noqa: E731
    barrier()
    t0 = time.perf_counter()
    fwd = measure_forward(ctx)
    sim_cfg: dict[str, Any] = {
        "forward_s": fwd,
        "latency_us": args.sim_latency_us,
        "modelled_world": args.sim_world,
        "ranks": sim_ranks,
        "auto": args.auto_sim,
        "modes": {},
    }
    for mode in ("broadcast", "allgather"):
        sim_cfg["modes"][mode] = sim_setup(ctx, mode, fwd)
    timings["sim_calibration"] = time.perf_counter() - t0
    log(
        f"simulated transport: forward {fwd * 1e3:.1f} ms (no hooks); "
        + ", ".join(
            f"{m} {c['bandwidth_gbps']:.3f} GB/s -> modelled sync {c['sync_s'] * 1e3:.1f} ms ({c['n_buckets']} buckets)"
            for m, c in sim_cfg["modes"].items()
        )
        + f"  ({timings['sim_calibration']:.0f} s)"
    )
    # zerocomm first: the blocking baseline then sleeps what zerocomm's sync really took
    for v in sorted(variants, key=lambda v: v == "sim_blocking"):
        barrier()
        t0 = time.perf_counter()
        if v == "sim_blocking":
            if "sim_zc_allgather" in results:
                sync_s = allreduce_mean(ctx, results["sim_zc_allgather"]["sync_total_per_step_s"])[0]
            else:
                sync_s = sim_cfg["modes"]["allgather"]["sync_s"]
            results[v] = run_alone(ctx, make_sim_blocking(ctx, sync_s), args.steps)
        else:
            mode = v.rsplit("_", 1)[1]
            c = sim_cfg["modes"][mode]
            tr = SimulatedTransport(args.sim_latency_us, c["bandwidth_gbps"], args.sim_world)
            results[v] = run_alone(ctx, make_zerocomm(ctx, mode, tr, v), args.steps)
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
        results[v] = run_alone(ctx, make_zerocomm(ctx, "allgather", tr, v, layers=L, keep_trace=False), args.steps)
        results[v].update(layers=L, bare_forward_s=fwd_l, sim=c)
        timings[v] = time.perf_counter() - t0
        _log_sim(log, v, results[v], timings[v])
    ctx.group, ctx.group_size, ctx.bucket_mb = None, ctx.world, args.bucket_mb
    return sim_cfg


def _write_outputs(report: dict[str, Any], results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """Rank 0: the JSON, the bar chart, the timeline (from the zerocomm runs' spans), the table."""
    out = Path(args.out)
    jpath = out / f"overlap_{args.device}.json"
    jpath.write_text(json.dumps(report, indent=1, default=float))
    plot_bars(report, out / f"overlap_{args.device}.png")
    timeline: dict[str, list[SpanRow]] = {
        v: results[v]["spans"]
        for v in ("sim_zc_allgather", "zc_allgather", "sim_zc_broadcast", "zc_broadcast")
        if v in results and "spans" in results[v]
    }
    if timeline:
        plot_timeline(report, timeline, out / f"overlap_timeline_{args.device}.png")
    print_summary(report)
    print(
        f"wrote {jpath}, {out / f'overlap_{args.device}.png'}"
        + (f", {out / f'overlap_timeline_{args.device}.png'}" if timeline else ""),
        flush=True,
    )


def run_all(rank: int, world: int, args: argparse.Namespace, device: torch.device, t_start: float) -> None:
    """The whole benchmark on one rank of an initialised process group."""
    ctx = Ctx(args, rank, world, device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    wanted = set(args.variants.split(",")) if args.variants else set(REAL_VARIANTS + SIM_VARIANTS)
    real = [v for v in REAL_VARIANTS if v in wanted] if args.transport in ("all", "real") else []
    sim = [v for v in SIM_VARIANTS if v in wanted] if args.transport in ("all", "simulated") else []
    log: Log = (lambda *m: print(*m, flush=True)) if rank == 0 else (lambda *m: None)
    skipped: dict[str, str] = {}
    if any(v.startswith("ds_") for v in real):
        why = _deepspeed().deepspeed_available()
        if why is not None:
            skipped = {v: why for v in real if v.startswith("ds_")}
            real = [v for v in real if v not in skipped]
            log(f"skipping {', '.join(skipped)}: {why}")
    model = ctx.make_model()
    n_params = sum(p.numel() for p in unique_params(model))
    del model
    log(
        f"TinyGPT dim={args.dim} layers={args.layers} heads={args.heads} seq={args.seq} vocab={args.vocab} "
        f"batch={args.batch}/rank: {n_params:,} params ({n_params * 4 / 2**20:.1f} MiB fp32); "
        f"{world} rank(s) on {device.type}; {args.steps} steps/variant in rounds of {args.round_steps} "
        f"(round 0 and each round's first {args.warmup} and last step unmeasured)"
    )
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    warm_process(ctx)
    _run_real(ctx, real, results, timings, log)
    sim_cfg: dict[str, Any] = {}
    sim_ranks = list(range(world)) if args.sim_ranks == "all" else [0]
    # new_group is collective over the whole world: every rank calls it, even those left out
    sim_group = dist.new_group(sim_ranks) if sim and len(sim_ranks) < world else None
    if sim and rank in sim_ranks:
        assert not isinstance(sim_group, int)  # a member gets the group, not NON_GROUP_MEMBER
        sim_cfg = _run_simulated(ctx, sim, sim_ranks, sim_group, results, timings, log)
    dist.barrier()

    # every rank's figures to rank 0 (spans stay on rank 0: only its timeline is drawn)
    mine = {v: {k: x for k, x in r.items() if k != "spans"} for v, r in results.items()}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return
    report = build_report(args, world, device, n_params, results, gathered, sim_cfg, timings, t_start)
    report["skipped"] = skipped
    _write_outputs(report, results, args)
