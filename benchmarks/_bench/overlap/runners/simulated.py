"""The simulated transport: its bandwidth calibration (sync of one step ~= the
forward pass) and the blocking baseline that sleeps the modelled sync."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..context import Ctx, allreduce_mean, lm_loss, state_bytes
from .loop import ALONE_WARMUP, plain_backward, run_alone
from .variant import Variant
from .zerocomm_runs import make_zerocomm


def make_sim_blocking(ctx: Ctx, sync_s: float) -> Variant:
    """Unsharded AdamW, then `sync_s` slept before the next forward: a sync nothing hides."""
    model = ctx.make_model()
    opt = ctx.adamw(model.parameters())
    slept: list[float] = []  # one per step, in step order

    def step(_s: int) -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctx.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        time.sleep(sync_s)  # the modelled param sync, done synchronously
        slept.append(time.perf_counter() - t0)

    def finish(out: dict[str, Any], measured: list[int]) -> dict[str, Any]:
        mine = [slept[s] for s in measured]
        out.update(
            opt_state_bytes=state_bytes(opt),
            sync_total_per_step_s=statistics.mean(mine),
            sync_exposed_per_step_s=statistics.mean(mine),
            exposed_fraction=1.0,
            modelled_sync_s=sync_s,
            note="unsharded AdamW; the modelled param-sync time slept after the step (exposed == total); "
            "no grad reduction modelled",
        )
        return out

    return Variant("sim_blocking", model, plain_backward, step, finish=finish)


def measure_forward(ctx: Ctx, layers: int | None = None, reps: int = 8) -> float:
    """Median bare forward time (no hooks, no sync), averaged over the group."""
    model = ctx.make_model(layers)
    ts: list[float] = []
    for s in range(reps):
        a = ctx.clock.mark()
        loss = lm_loss(model, *ctx.batch(s))
        b = ctx.clock.mark()
        ctx.clock.resolve()
        ts.append(ctx.clock.elapsed(a, b))
        del loss
    del model
    return allreduce_mean(ctx, statistics.median(ts[2:]))[0]  # every rank models the same network


def modelled_sync(ctx: Ctx, mode: str, bw_gbps: float, layers: int | None = None) -> dict[str, Any]:
    """What SimulatedCommunicator will charge for one step's param sync of `mode`."""
    from zerocomm.plan import build_plan

    a = ctx.args
    model = ctx.make_model(layers)
    plan = build_plan(model, mode=mode, world_size=1, bucket_mb=ctx.bucket_mb)
    factor = 1.0 if mode == "broadcast" else (a.sim_world - 1) / a.sim_world
    nbytes = sum(b.nbytes for b in plan.buckets)
    lat = a.sim_latency_us * 1e-6
    return {
        "bytes": nbytes,
        "n_buckets": len(plan.buckets),
        "factor": factor,
        "sync_s": len(plan.buckets) * lat + factor * nbytes / (bw_gbps * 1e9),
    }


def calibrate_bandwidth(ctx: Ctx, mode: str, fwd_s: float, layers: int | None = None) -> float:
    m = modelled_sync(ctx, mode, 1.0, layers)
    budget = fwd_s - m["n_buckets"] * ctx.args.sim_latency_us * 1e-6
    if budget <= 0:
        raise SystemExit(f"--sim-latency-us too large: {m['n_buckets']} buckets' latency exceeds the forward pass")
    return m["factor"] * m["bytes"] / budget / 1e9


def sim_setup(ctx: Ctx, mode: str, fwd_s: float, layers: int | None = None) -> dict[str, Any]:
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
    probe = run_alone(ctx, make_zerocomm(ctx, mode, tr, "probe", layers=layers, keep_trace=False), ALONE_WARMUP + 5)
    fwd_compute = statistics.median(probe["forward_s"]) - probe["sync_exposed_per_step_s"]
    overhead = probe["sync_total_per_step_s"] - m0["sync_s"]
    fwd_compute, overhead = allreduce_mean(ctx, fwd_compute, overhead)
    budget = fwd_compute - overhead - m0["n_buckets"] * a.sim_latency_us * 1e-6
    bw = m0["factor"] * m0["bytes"] / budget / 1e9 if budget > 0 else bw0
    return {
        "bandwidth_gbps": bw,
        "first_guess_gbps": bw0,
        "probe_sync_s": probe["sync_total_per_step_s"],
        "probe_forward_compute_s": fwd_compute,
        "probe_unmodelled_overhead_s": overhead,
        **modelled_sync(ctx, mode, bw, layers),
    }
