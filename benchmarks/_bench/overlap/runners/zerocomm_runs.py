"""(c), (d) and the sim_zc_* variants: zerocomm.attach over any transport, timed
from zerocomm's own trace and stats."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..context import Ctx, state_bytes
from .variant import Variant

if TYPE_CHECKING:  # zerocomm is imported in the ranks only, after the group exists
    from zerocomm.optimizer import ZeroOptimizer
    from zerocomm.telemetry import Span
    from zerocomm.transport import SimulatedTransport


def _bucket_block_names(zopt: ZeroOptimizer) -> dict[str, str]:
    """scheduler label -> readable name ('grad:dense:3' -> 'grad:blocks.2')."""
    names: dict[str, str] = {}
    for u in zopt.sync.units:
        plan = u.plan
        for b in plan.buckets:
            first, last = plan.blocks[b.blocks[0]].name, plan.blocks[b.blocks[-1]].name
            nm = first if first == last else f"{first}..{last}"
            names[f"grad:{u.name}:{b.index}"] = f"grad:{nm}"
    return names


def _wait_call_us(spans: list[Span]) -> dict[str, Any]:
    ds = sorted(s.duration * 1e6 for s in spans if s.lane == "wait" and not s.label.startswith("grad"))
    if not ds:
        return {}
    return {"min": ds[0], "p10": ds[len(ds) // 10], "median": ds[len(ds) // 2], "n": len(ds)}


def exposed_by_block(spans: list[Span], gens: int) -> dict[str, float]:
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


def _buffer_bytes(zopt: ZeroOptimizer) -> int:
    """Bytes of zerocomm's own buffers: param flats, grad flats and grad shards."""
    return zopt.buffer_bytes()


def make_zerocomm(
    ctx: Ctx,
    mode: str,
    transport: str | SimulatedTransport,
    tag: str,
    layers: int | None = None,
    keep_trace: bool = True,
) -> Variant:
    import zerocomm

    model = ctx.make_model(layers)
    opt = ctx.adamw(model.parameters())
    zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=ctx.bucket_mb, transport=transport, group=ctx.group)
    sched = zopt.sync.units[0].sched
    a = ctx.args
    traced = {"armed": False, "on": False, "launches": 0}

    def backward(loss: torch.Tensor) -> None:
        i = sched.trace_begin("compute", "backward")
        loss.backward()
        sched.trace_end(i)

    def step(_s: int) -> None:
        if traced["armed"] and not traced["on"]:
            # From this launch on: every traced launch is consumed by a traced
            # forward (the round's last one by pause()'s synchronize).
            zopt.enable_tracing()
            traced["on"] = True
        i = sched.trace_begin("compute", "zopt.step()")
        zopt.step()
        sched.trace_end(i)
        zopt.zero_grad()
        traced["launches"] += traced["on"]

    def start_measuring() -> None:
        traced["armed"] = True

    def finish(out: dict[str, Any], measured: list[int]) -> dict[str, Any]:
        stats = zopt.stats()
        spans = zopt.trace()
        gens = max(1, traced["launches"])  # launches traced
        plan = zopt.plan
        waits_by_bucket = {k: v / gens for k, v in stats["wait_by_bucket_s"].items()}
        out.update(
            opt_state_bytes=state_bytes(zopt.optim),
            zerocomm_buffer_bytes=_buffer_bytes(zopt),
            sync_total_s=stats["sync_total_s"],
            sync_exposed_s=stats["sync_exposed_s"],
            exposed_fraction=stats["exposed_fraction"],
            traced_syncs=gens,
            sync_total_per_step_s=stats["sync_total_s"] / gens,
            sync_exposed_per_step_s=stats["sync_exposed_s"] / gens,
            # tracing starts at a launch: the backward of that step was not traced
            grad_reduce_per_step_s=stats["grad_reduce_total_s"] / max(1, gens - 1),
            grad_wait_per_step_s=stats["grad_wait_s"] / max(1, gens - 1),
            bucket_sync_median_s={k: v["median_s"] for k, v in stats["buckets"].items()},
            wait_per_step_by_bucket_s=waits_by_bucket,
            exposed_per_step_by_block_s=exposed_by_block(spans, gens),
            # wait-lane span durations (C++ wait_param only, without the Python hook around it):
            # the small ones are waits whose bucket had already arrived
            wait_span_us=_wait_call_us(spans),
            n_buckets=len(plan.buckets),
            bucket_order=[plan.buckets[i].index for i in zopt.sync.units[0].order],
            plan_rank_numel=plan.rank_numel,
            transport=sched.transport,
            note="sync_total: param buckets on the comm lane; exposed: compute waiting for them "
            "(zopt.stats()); per step = over the traced launches",
        )
        if keep_trace and ctx.rank == 0:
            path = Path(a.out) / f"overlap_trace_{tag}_{a.device}.json"
            zopt.export_chrome_trace(str(path))
            out["chrome_trace"] = str(path)
            names = _bucket_block_names(zopt)
            out["spans"] = [(s.lane, names.get(s.label, s.label), s.start, s.end) for s in spans]
        return out

    return Variant(
        tag,
        model,
        backward,
        step,
        pause=zopt.synchronize,  # the round's last sync lands before the next variant runs
        start_measuring=start_measuring,
        finish=finish,
        close=zopt.close,
    )
