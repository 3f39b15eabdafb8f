"""Opt-in telemetry: per-bucket sync spans and per-block waits, recorded by
the scheduler with CUDA events (timestamps on CPU) only while enabled;
summarised by `stats()` and exported as a Chrome trace (chrome://tracing,
Perfetto)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch.nn as nn


@dataclass
class Span:
    lane: str  # "comm", "wait" or "compute"
    label: str
    start: float  # seconds since tracing was enabled
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Tracer:
    """Marks block forwards on the compute lane (hooks call it)."""

    sched: Any  # _C.SyncScheduler
    names: dict[nn.Module, str]
    _open: list[int] = field(default_factory=list)

    def begin_block(self, module: nn.Module) -> None:
        self._open.append(self.sched.trace_begin("compute", self.names.get(module, "?")))

    def end_block(self, module: nn.Module) -> None:
        if self._open:
            self.sched.trace_end(self._open.pop())


def collect(scheds: list[Any]) -> list[Span]:
    spans = [Span(*row) for s in scheds for row in s.trace()]
    return sorted(spans, key=lambda s: s.start)


def traffic(scheds: list[Any]) -> dict[str, dict[str, int]]:
    """Bytes this rank handed to zerocomm's collectives since attach, per
    communicator tier ("shard": the shard group's, "replica": across the
    replicas) and collective, summed over the schedulers: counted by the
    scheduler as each collective is issued (always on)."""
    out: dict[str, dict[str, int]] = {"shard": {}, "replica": {}}
    for s in scheds:
        for tier, op, _calls, nbytes in s.traffic():
            out[tier][op] = out[tier].get(op, 0) + int(nbytes)
    return out


def summarize(spans: list[Span]) -> dict:
    """Total sync time (param buckets on the comm lane), exposed sync time
    (compute waiting for parameters), and per-bucket / per-block figures."""
    sync = [s for s in spans if s.lane == "comm" and not s.label.startswith("grad")]
    grad = [s for s in spans if s.lane == "comm" and s.label.startswith("grad")]
    # Waits of the forward for its parameters; synchronize() outside a forward
    # is the caller's choice, not sync time the forward was exposed to.
    waits = [s for s in spans if s.lane == "wait" and not s.label.startswith("grad") and s.label != "synchronize"]
    per_bucket: dict[str, list[float]] = {}
    for s in sync:
        per_bucket.setdefault(s.label, []).append(s.duration)
    per_wait: dict[str, float] = {}
    for s in waits:
        per_wait[s.label] = per_wait.get(s.label, 0.0) + s.duration
    total = sum(s.duration for s in sync)
    exposed = sum(s.duration for s in waits)
    return {
        "sync_total_s": total,
        "sync_exposed_s": exposed,
        "exposed_fraction": exposed / total if total > 0 else 0.0,
        "grad_reduce_total_s": sum(s.duration for s in grad),
        "grad_wait_s": sum(s.duration for s in spans if s.lane == "wait" and s.label.startswith("grad")),
        "buckets": {k: {"count": len(v), "median_s": median(v), "total_s": sum(v)} for k, v in per_bucket.items()},
        "wait_by_bucket_s": per_wait,
    }


def chrome_trace(spans: list[Span], path: str | Path) -> Path:
    """Writes a Chrome trace JSON: one thread row per lane."""
    lanes = {"compute": 1, "wait": 2, "comm": 3}
    for s in spans:
        lanes.setdefault(s.lane, len(lanes) + 1)
    events = [
        {"ph": "M", "pid": 0, "tid": tid, "name": "thread_name", "args": {"name": lane}} for lane, tid in lanes.items()
    ]
    for s in spans:
        events.append(
            {
                "ph": "X",
                "pid": 0,
                "tid": lanes[s.lane],
                "name": s.label,
                "ts": s.start * 1e6,
                "dur": max(s.duration, 0.0) * 1e6,
                "cat": s.lane,
            }
        )
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path
