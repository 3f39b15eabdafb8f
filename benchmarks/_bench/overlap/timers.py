"""Timing and memory of one variant on one rank."""

from __future__ import annotations

import gc
import resource
import time
from typing import Any

import torch

# A mark is a perf_counter float on CPU and a recorded CUDA event on CUDA: events
# time the compute stream without a per-step device sync, which would serialise
# the comm stream behind it.
Mark = Any


class Clock:
    """Time marks: perf_counter on CPU, CUDA events on the current stream."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Mark:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a: Mark, b: Mark) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a

    def resolve(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Recorder:
    """Per-step phase marks: start, after forward, after backward (+ grad sync), end.
    Steps run in rounds (loop.run_rounds); a step's time runs from its start to the
    next step's start in the same round, so the round's last step only closes the
    step before it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.marks: list[dict[str, Mark]] = []  # per global step
        self.losses: list[torch.Tensor] = []

    def mark(self, key: str) -> None:
        if key == "start":
            self.marks.append({})
        self.marks[-1][key] = self.clock.mark()

    def finish(self, measured: list[int]) -> dict[str, Any]:
        """Figures of the `measured` steps (each followed by a step of the same round)."""
        self.clock.resolve()
        el, m = self.clock.elapsed, self.marks
        return {
            "step_s": [el(m[i]["start"], m[i + 1]["start"]) for i in measured],
            "forward_s": [el(m[i]["start"], m[i]["fwd"]) for i in measured],
            "backward_s": [el(m[i]["fwd"], m[i]["bwd"]) for i in measured],
            "optimizer_s": [el(m[i]["bwd"], m[i]["end"]) for i in measured],
            "measured_steps": list(measured),
            "losses": [float(x) for x in self.losses],
        }


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
    """Peak memory of one variant on this rank (reset() before the variant, peak() after)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.base = 0
        self.resettable = False

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

    def peak(self) -> dict[str, Any]:
        if self.cuda:
            return {
                "peak_bytes": torch.cuda.max_memory_allocated(),
                "base_bytes": self.base,
                "kind": "torch.cuda.max_memory_allocated",
            }
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "peak_bytes": peak,
            "base_bytes": self.base,
            "kind": "ru_maxrss" + (" (reset per variant)" if self.resettable else " (process lifetime)"),
        }
