"""Flatten / unflatten bandwidth: zerocomm's fused copy against torch's ways.

    python benchmarks/flatten.py --device cpu            # ~2-3 min on 2 cores
    python benchmarks/flatten.py --device cuda
    python benchmarks/flatten.py --device cpu --quick    # small grid, seconds
    python benchmarks/flatten.py --device cpu --contended  # beside a busy process, as in training

Methods (fp32, tensors and buffers allocated once per grid point):

flatten   zerocomm        zerocomm.flatten(ts, out=flat, layout=layout)   (hot-loop use)
          zerocomm_alloc  zerocomm.flatten(ts, layout=layout)             (allocates + zero-fills)
          cat             torch._utils._flatten_dense_tensors(ts)         (torch.cat, allocates)
          cat_out         torch.cat([t.view(-1) ...], out=flat)
          foreach         torch._foreach_copy_(views_of_flat, ts)
unflatten zerocomm        zerocomm.unflatten(flat, ts, layout=layout)
          cat             _unflatten_dense_tensors(flat, ts) + t.copy_(v) per tensor
          foreach         torch._foreach_copy_(ts, views_of_flat)
          split_copy      torch.split_with_sizes_copy(flat, sizes, out=[t.view(-1) ...])
baseline  copy            one dst.copy_(src) of the same total bytes: the device's
                          practical copy bandwidth, measured in the same run

GB/s counts the payload once (sum of the tensors' bytes / time), not read+write.
Each method is checked for a correct result once before it is timed. An op's
methods are timed side by side in rounds (Timer): each round calls every
method in turn, warm-up calls first, so load changes fall on all of them.

--contended keeps a busy process (a 1-thread matmul loop) on each other core
while it measures: in training the comm worker copies beside the forward's
compute, and a copy that needs every core collapses there. It writes
flatten_<device>_contended.{json,png} and checks that zerocomm is never below
torch.cat (flatten) and split_with_sizes_copy (unflatten) at any grid point.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

import zerocomm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

KB = 1024
MB = 1024 * 1024
COUNTS = [1, 10, 100, 1000, 10000]
SIZES = [1 * KB, 4 * KB, 64 * KB, 1 * MB, 64 * MB]
QUICK_COUNTS = [10, 1000]
QUICK_SIZES = [4 * KB, 1 * MB]
HEADLINE = (1000, 4 * KB)  # always measured: the figure the design doc quotes

FLATTEN_METHODS = ["zerocomm", "zerocomm_alloc", "cat", "cat_out", "foreach"]
UNFLATTEN_METHODS = ["zerocomm", "cat", "foreach", "split_copy"]


def human_bytes(n: int) -> str:
    for unit, div in (("GB", 1024**3), ("MB", MB), ("KB", KB)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


# ------------------------------------------------------------------ machine info


# ------------------------------------------------------------------ timing


class Timer:
    """Times the methods of one grid point side by side, in rounds.

    Each round calls every method in turn (the order rotates from round to
    round): `warmup` unmeasured calls, then `per_round` measured ones. A
    method's caches are warm when it is measured, and a change in the
    machine's load (a contender's burst, another process) falls on all methods
    alike instead of on whichever ran at that moment. Rounds go on until every
    method has `iters` runs, or at least `min_iters` once `budget_s` per
    method is spent."""

    def __init__(self, device: str, iters: int, warmup: int, budget_s: float, min_iters: int = 5, per_round: int = 3):
        self.device = device
        self.iters = iters
        self.warmup = warmup
        self.budget_s = budget_s
        self.min_iters = min(min_iters, iters)
        self.per_round = per_round

    def __call__(self, fn) -> list[float]:
        return self.side_by_side({"fn": fn})["fn"]

    def side_by_side(self, fns: dict) -> dict[str, list[float]]:
        names = list(fns)
        times: dict[str, list[float]] = {n: [] for n in names}
        budget = self.budget_s * len(names)
        start_all = time.perf_counter()
        rnd = 0
        while min(len(t) for t in times.values()) < self.iters:
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                fn = fns[name]
                for _ in range(self.warmup):
                    fn()
                for _ in range(min(self.per_round, self.iters - len(times[name]))):
                    times[name].append(self._one(fn))
            rnd += 1
            done = min(len(t) for t in times.values()) >= self.min_iters
            if done and time.perf_counter() - start_all > budget:
                break
        return times

    def _one(self, fn) -> float:
        if self.device != "cuda":
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        # An idle GPU at the start event: the measured span then includes
        # the host work of `fn` (table building, Python loops, launches).
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def count_launches_cuda(fn) -> dict | None:
    """Kernels / memcpys / memsets one call of `fn` puts on the GPU (torch.profiler)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = memcpy = memset = 0
        for evt in prof.events():
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            name = evt.name.lower()
            if "memcpy" in name:
                memcpy += 1
            elif "memset" in name:
                memset += 1
            else:
                kernels += 1
        return {"kernels": kernels, "memcpy": memcpy, "memset": memset}
    except Exception as e:  # profiler unavailable / CUPTI missing: report expected only
        return {"error": f"{type(e).__name__}: {e}"}


def foreach_launches_cuda(numels: list[int]) -> int:
    """multi_tensor_apply's launches for a depth-2 list (64 tensors / 320 blocks of
    65,536 elements per launch in recent torch) - an estimate, not a measurement."""
    max_tensors, max_blocks, chunk = 64, 320, 65536
    launches = tensors = blocks = 0
    for n in numels:
        if n == 0:
            continue
        tensors += 1
        chunks = math.ceil(n / chunk)
        for c in range(chunks):
            blocks += 1
            last_chunk = c == chunks - 1
            if blocks == max_blocks or (tensors == max_tensors and last_chunk):
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1
    return launches + (1 if blocks else 0)


def expected_launches(device: str, op: str, method: str, numels: list[int]) -> tuple[int, str]:
    n = sum(1 for x in numels if x)
    if device == "cuda":
        table = {
            ("flatten", "zerocomm"): (2, "1 copy kernel + 1 H2D copy of the pointer table"),
            ("flatten", "zerocomm_alloc"): (3, "1 copy kernel + 1 H2D table copy + 1 zero-fill"),
            ("flatten", "cat"): (
                math.ceil(n / 128),
                "torch's CUDA cat batches inputs (128 per launch in recent torch)",
            ),
            ("flatten", "cat_out"): (
                math.ceil(n / 128),
                "torch's CUDA cat batches inputs (128 per launch in recent torch)",
            ),
            ("flatten", "foreach"): (
                foreach_launches_cuda(numels),
                "multi_tensor_apply: <=64 tensors, <=320 chunks of 64K elements per launch",
            ),
            ("unflatten", "zerocomm"): (2, "1 copy kernel + 1 H2D copy of the pointer table"),
            ("unflatten", "cat"): (n, "one copy_ per tensor"),
            ("unflatten", "foreach"): (
                foreach_launches_cuda(numels),
                "multi_tensor_apply: <=64 tensors, <=320 chunks of 64K elements per launch",
            ),
            ("unflatten", "split_copy"): (1, "split_with_sizes_copy's fused CUDA kernel"),
        }
    else:
        table = {
            ("flatten", "zerocomm"): (1, "one fused byte copy (csrc/cpu_copy.cpp)"),
            ("flatten", "zerocomm_alloc"): (2, "zero-fill of the padding + one fused byte copy"),
            ("flatten", "cat"): (1, "one cat op"),
            ("flatten", "cat_out"): (1, "one cat op"),
            ("flatten", "foreach"): (n, "CPU _foreach_copy_ is the slow path: one copy_ per tensor"),
            ("unflatten", "zerocomm"): (1, "one fused byte copy (csrc/cpu_copy.cpp)"),
            ("unflatten", "cat"): (n, "one copy_ per tensor"),
            ("unflatten", "foreach"): (n, "CPU _foreach_copy_ is the slow path: one copy_ per tensor"),
            ("unflatten", "split_copy"): (n, "CPU split_with_sizes_copy copies slice by slice"),
        }
    return table[(op, method)]


# ------------------------------------------------------------------ one grid point


def make_methods(ts: list[torch.Tensor], dst: list[torch.Tensor], flat: torch.Tensor, layout) -> tuple[dict, dict]:
    views = [flat[o : o + n] for o, n in zip(layout.offsets, layout.numels)]
    flat_ts = [t.view(-1) for t in ts]
    flat_dst = [t.view(-1) for t in dst]
    sizes = list(layout.numels)
    packed = flat[: sum(sizes)]  # the grid's sizes are 16-byte multiples: no padding

    def fl_zerocomm():
        return zerocomm.flatten(ts, out=flat, layout=layout)

    def fl_zerocomm_alloc():
        return zerocomm.flatten(ts, layout=layout)

    def fl_cat():
        return _flatten_dense_tensors(ts)

    def fl_cat_out():
        return torch.cat(flat_ts, out=packed)

    def fl_foreach():
        torch._foreach_copy_(views, ts)
        return flat

    def un_zerocomm():
        zerocomm.unflatten(flat, dst, layout=layout)

    def un_cat():
        for t, v in zip(dst, _unflatten_dense_tensors(packed, dst)):
            t.copy_(v)

    def un_foreach():
        torch._foreach_copy_(dst, views)

    def un_split():
        torch.split_with_sizes_copy(packed, sizes, out=flat_dst)

    flatten = {
        "zerocomm": fl_zerocomm,
        "zerocomm_alloc": fl_zerocomm_alloc,
        "cat": fl_cat,
        "cat_out": fl_cat_out,
        "foreach": fl_foreach,
    }
    unflatten = {"zerocomm": un_zerocomm, "cat": un_cat, "foreach": un_foreach, "split_copy": un_split}
    return flatten, unflatten


def run_point(device: str, count: int, size: int, timer: Timer, profile: bool, copy_cache: dict) -> list[dict]:
    numel = size // 4
    gen = torch.Generator(device=device).manual_seed(count * 7919 + size)
    ts = [torch.rand(numel, device=device, generator=gen) for _ in range(count)]
    layout = zerocomm.FlatLayout(ts, align_bytes=16)
    assert layout.total_numel == count * numel, "grid sizes must give a layout without padding"
    reference = torch.cat([t.view(-1) for t in ts])
    flat = torch.zeros(layout.total_numel, device=device)
    dst = [torch.zeros_like(t) for t in ts]
    total = count * size
    flatten, unflatten = make_methods(ts, dst, flat, layout)

    rows = []

    def record(op, methods: dict, zero_copy: dict) -> None:
        for method, times in timer.side_by_side(methods).items():
            med, best = statistics.median(times), min(times)
            exp, note = expected_launches(device, op, method, list(layout.numels))
            row = {
                "op": op,
                "method": method,
                "count": count,
                "tensor_bytes": size,
                "total_bytes": total,
                "runs": len(times),
                "median_s": med,
                "best_s": best,
                "gbps": total / med / 1e9,
                "gbps_best": total / best / 1e9,
                "launches_expected": exp,
                "launches_expected_note": note,
                "launches_measured": None,
                # _flatten_dense_tensors returns a view of a single tensor: nothing is copied.
                "zero_copy": zero_copy.get(method, False),
            }
            if device == "cuda" and profile:
                row["launches_measured"] = count_launches_cuda(methods[method])
            rows.append(row)

    # Every method is checked once, then all of an op's methods are timed side
    # by side (each writes the same bytes, so `flat` stays the reference).
    zero_copy = {}
    for method, fn in flatten.items():
        flat.zero_()
        res = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if not torch.equal(res[: reference.numel()], reference):
            raise AssertionError(f"flatten/{method} gave a wrong result for {count} x {human_bytes(size)}")
        zero_copy[method] = any(res.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in ts)
        del res
    record("flatten", flatten, zero_copy)

    flat.copy_(reference)
    for method, fn in unflatten.items():
        for t in dst:
            t.zero_()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if not all(torch.equal(a, b) for a, b in zip(dst, ts)):
            raise AssertionError(f"unflatten/{method} gave a wrong result for {count} x {human_bytes(size)}")
    record("unflatten", unflatten, {})

    if total not in copy_cache:
        src = reference
        out = torch.empty_like(src)
        times = timer(lambda: out.copy_(src))
        med = statistics.median(times)
        copy_cache[total] = {
            "total_bytes": total,
            "median_s": med,
            "best_s": min(times),
            "gbps": total / med / 1e9,
            "runs": len(times),
        }
        del out
    base = copy_cache[total]["gbps"]
    for r in rows:
        r["ratio_to_copy"] = r["gbps"] / base
    del ts, dst, flat, reference
    return rows


def cpu_thread_scaling(timer: Timer) -> dict:
    """What torch's intra-op threads give: 16 x 1MB with one thread and with the
    default count, for zerocomm (one thread by design) and for torch's copy_."""
    threads = torch.get_num_threads()
    ts = [torch.rand(MB // 4) for _ in range(16)]
    layout = zerocomm.FlatLayout(ts)
    flat = torch.empty(layout.total_numel)
    src = torch.cat(ts)
    out = {"threads": threads, "bytes": 16 * MB}
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            out[f"zerocomm_s_{n}t"] = statistics.median(timer(lambda: zerocomm.flatten(ts, out=flat, layout=layout)))
            out[f"copy_s_{n}t"] = statistics.median(timer(lambda: flat.copy_(src)))
    finally:
        torch.set_num_threads(threads)
    out["zerocomm_speedup"] = out["zerocomm_s_1t"] / out[f"zerocomm_s_{threads}t"]
    out["copy_speedup"] = out["copy_s_1t"] / out[f"copy_s_{threads}t"]
    return out


def _busy(ready, stop) -> None:
    torch.set_num_threads(1)
    a = torch.rand(256, 256)
    ready.set()
    while not stop.is_set():
        a = torch.tanh(a @ a)


class Contenders:
    """One busy process per core but this one (--contended), started before the
    grid and stopped after it."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.procs = []
        for _ in range(n):
            ready = ctx.Event()
            pr = ctx.Process(target=_busy, args=(ready, self.stop), daemon=True)
            pr.start()
            self.procs.append((pr, ready))

    def __enter__(self) -> "Contenders":
        for _pr, ready in self.procs:
            ready.wait(60)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for pr, _ready in self.procs:
            pr.join(10)
            if pr.is_alive():
                pr.terminate()


def contended_check(rows: list[dict]) -> dict:
    """zerocomm / torch's way at every grid point: flatten vs cat, unflatten vs split_copy."""
    out: dict = {"criterion": "zerocomm >= torch.cat (flatten) and >= split_with_sizes_copy (unflatten) everywhere"}
    for op, other in (("flatten", "cat"), ("unflatten", "split_copy")):
        ratios = []
        for r in rows:
            if r["op"] != op or r["method"] != "zerocomm":
                continue
            o = next(
                x
                for x in rows
                if x["op"] == op
                and x["method"] == other
                and (x["count"], x["tensor_bytes"]) == (r["count"], r["tensor_bytes"])
            )
            if o.get("zero_copy"):
                continue  # torch returned a view: nothing was copied
            ratios.append((r["gbps"] / o["gbps"], r["count"], r["tensor_bytes"]))
        worst = min(ratios)
        out[op] = {
            "vs": other,
            "min_ratio": worst[0],
            "at": f"{worst[1]}x{human_bytes(worst[2])}",
            "ratios": {f"{c}x{human_bytes(b)}": x for x, c, b in ratios},
        }
    out["pass"] = all(out[op]["min_ratio"] >= 1.0 for op in ("flatten", "unflatten"))
    return out


# ------------------------------------------------------------------ report


def print_tables(rows: list[dict], copies: dict) -> None:
    points = sorted({(r["count"], r["tensor_bytes"]) for r in rows}, key=lambda p: (p[0] * p[1], p[0]))
    for op, methods in (("flatten", FLATTEN_METHODS), ("unflatten", UNFLATTEN_METHODS)):
        print(f"\n{op}: GB/s from the median time (x = fraction of one big copy_ of the same bytes)")
        head = f"{'count':>6} {'size':>6} {'total':>7} {'copy_':>7} |" + "".join(f" {m:>15}" for m in methods)
        print(head)
        print("-" * len(head))
        for count, size in points:
            cells = []
            for m in methods:
                r = next(
                    (
                        r
                        for r in rows
                        if r["op"] == op and r["method"] == m and r["count"] == count and r["tensor_bytes"] == size
                    ),
                    None,
                )
                if r is None:
                    cells.append(f" {'-':>15}")
                elif r["zero_copy"]:
                    cells.append(f" {'view, no copy':>15}")
                else:
                    cells.append(f" {r['gbps']:7.2f} ({r['ratio_to_copy']:4.2f})")
            print(
                f"{count:>6} {human_bytes(size):>6} {human_bytes(count * size):>7} "
                f"{copies[count * size]['gbps']:7.2f} |" + "".join(cells)
            )


def plot(rows: list[dict], copies: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = {
        "zerocomm": "C3",
        "zerocomm_alloc": "C1",
        "cat": "C0",
        "cat_out": "C9",
        "foreach": "C2",
        "split_copy": "C4",
    }
    sizes = sorted({r["tensor_bytes"] for r in rows})
    markers = dict(zip(sizes, ["o", "s", "^", "D", "v", "P", "X"]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    cx = sorted(copies)
    for ax, (op, methods) in zip(axes, (("flatten", FLATTEN_METHODS), ("unflatten", UNFLATTEN_METHODS))):
        ax.plot(cx, [copies[x]["gbps"] for x in cx], "k--", lw=1.5, label="one copy_ (same bytes)")
        for m in methods:
            for s in sizes:
                pts = sorted(
                    (r["total_bytes"], r["gbps"])
                    for r in rows
                    if r["op"] == op and r["method"] == m and r["tensor_bytes"] == s and not r["zero_copy"]
                )
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        color=colors[m],
                        marker=markers[s],
                        lw=1,
                        ms=5,
                        alpha=0.85,
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("total bytes copied")
        ax.set_title(f"{op} (lines join equal per-tensor sizes)")
        ax.grid(True, which="both", alpha=0.3)
        handles = [Line2D([], [], color="k", ls="--", label="one copy_ (same bytes)")]
        handles += [Line2D([], [], color=colors[m], label=m) for m in methods]
        handles += [
            Line2D([], [], color="gray", marker=markers[s], ls="", label=f"{human_bytes(s)} tensors") for s in sizes
        ]
        ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.6)
    axes[0].set_ylabel("GB/s (payload bytes / median time)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="output folder")
    p.add_argument("--iters", type=int, default=30, help="timed runs per method (fewer when --budget-s runs out)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured calls per method before each round's 3 timed ones")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget per method and grid point (default 0.6 s cpu, 0.3 s cuda); at least 5 runs",
    )
    p.add_argument(
        "--max-total-mb",
        type=float,
        default=None,
        help="skip grid points above this many MB (default 512 cuda, 256 cpu)",
    )
    p.add_argument("--quick", action="store_true", help="small grid")
    p.add_argument("--no-profile", action="store_true", help="cuda: do not count launches with torch.profiler")
    p.add_argument(
        "--profile-headline",
        action="store_true",
        help="cuda: count launches at the headline point only (one profiler session per method, not per grid point)",
    )
    p.add_argument("--contended", action="store_true", help="cpu: measure beside a busy process on every other core")
    args = p.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if device == "cuda" and not zerocomm.build_info().get("cuda"):
        p.error("zerocomm was built without CUDA")
    max_total = (args.max_total_mb if args.max_total_mb is not None else (512 if device == "cuda" else 256)) * MB
    budget = args.budget_s if args.budget_s is not None else (0.6 if device == "cpu" else 0.3)
    counts, sizes = (QUICK_COUNTS, QUICK_SIZES) if args.quick else (COUNTS, SIZES)
    grid = [(c, s) for c in counts for s in sizes if c * s <= max_total]
    skipped = [(c, s) for c in counts for s in sizes if c * s > max_total]
    if HEADLINE not in grid:
        grid.append(HEADLINE)
    grid.sort(key=lambda p: (p[0] * p[1], p[0]))

    info = machine_info(device)
    load = info.get("loadavg_at_start", [0])[0]
    print(
        f"zerocomm flatten benchmark on {device}: {info['device_name']}, torch {info['torch_version']}, "
        f"{info['cpu_count']} cpus, {info['torch_num_threads']} torch threads"
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.2f} at start: other work is running, figures will be noisy")
    print(
        f"{len(grid)} grid points (skipped above {human_bytes(int(max_total))}: "
        f"{', '.join(f'{c}x{human_bytes(s)}' for c, s in skipped) or 'none'})"
    )

    if args.contended and device != "cpu":
        p.error("--contended is a CPU mode")
    n_busy = max(1, (os.cpu_count() or 2) - 1) if args.contended else 0
    if n_busy:
        print(f"contended: {n_busy} busy process(es) (1-thread matmul loop) beside this one")
    timer = Timer(device, args.iters, args.warmup, budget)
    rows: list[dict] = []
    copies: dict = {}
    t_start = time.perf_counter()
    scaling = None
    with Contenders(n_busy):
        for count, size in grid:
            t0 = time.perf_counter()
            profile = not args.no_profile and (not args.profile_headline or (count, size) == HEADLINE)
            rows += run_point(device, count, size, timer, profile, copies)
            print(
                f"  {count:>6} x {human_bytes(size):>5} = {human_bytes(count * size):>6}  "
                f"({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
            if device == "cuda":
                torch.cuda.empty_cache()
        if device == "cpu" and torch.get_num_threads() > 1:
            scaling = cpu_thread_scaling(timer)
    elapsed = time.perf_counter() - t_start
    check = contended_check(rows) if args.contended else None

    print_tables(rows, copies)

    def get(op, method, count, size):
        return next(
            r
            for r in rows
            if r["op"] == op and r["method"] == method and r["count"] == count and r["tensor_bytes"] == size
        )

    hz = get("flatten", "zerocomm", *HEADLINE)
    hza = get("flatten", "zerocomm_alloc", *HEADLINE)
    hc = get("flatten", "cat", *HEADLINE)
    hf = get("flatten", "foreach", *HEADLINE)
    hu = get("unflatten", "zerocomm", *HEADLINE)
    hus = get("unflatten", "split_copy", *HEADLINE)
    ratio = hz["gbps"] / hc["gbps"]
    print()
    print(f"1000 x 4KB flatten: zerocomm {hz['gbps']:.2f} GB/s, torch.cat {hc['gbps']:.2f} GB/s, ratio {ratio:.2f}")
    print(
        f"  (zerocomm allocating its buffer: {hza['gbps']:.2f} GB/s, ratio {hza['gbps'] / hc['gbps']:.2f}; "
        f"_foreach_copy_ {hf['gbps']:.2f} GB/s; one 4MB copy_ {copies[HEADLINE[0] * HEADLINE[1]]['gbps']:.2f} GB/s)"
    )
    print(f"1000 x 4KB unflatten: zerocomm {hu['gbps']:.2f} GB/s, split_with_sizes_copy {hus['gbps']:.2f} GB/s")
    if scaling:
        n = scaling["threads"]
        print(
            f"CPU thread scaling, 16 x 1MB flatten, 1 -> {n} threads: zerocomm x{scaling['zerocomm_speedup']:.2f}, "
            f"copy_ x{scaling['copy_speedup']:.2f}"
        )
        print(
            "  (zerocomm's CPU copy: one team over all bytes when the tensors average 256 KiB or more, "
            "else the calling thread: [Note: CPU copy threading], csrc/cpu_copy.cpp)"
        )
    if ratio < 1.0:
        print(f"NOTE: zerocomm flatten is SLOWER than torch.cat for 1000 x 4KB on {device} (ratio {ratio:.2f})")
    if check:
        for op in ("flatten", "unflatten"):
            c = check[op]
            print(f"contended {op}: zerocomm / {c['vs']} >= {c['min_ratio']:.2f} at every point (lowest at {c['at']})")
        print(f"contended check: {'PASS' if check['pass'] else 'MISS'} ({check['criterion']})")

    try:
        info["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{device}_contended" if args.contended else device
    json_path = out_dir / f"flatten_{tag}.json"
    png_path = out_dir / f"flatten_{tag}.png"
    doc = {
        "benchmark": "flatten",
        "machine": info,
        "config": {
            "device": device,
            "dtype": "float32",
            "align_bytes": 16,
            "iters": args.iters,
            "warmup": args.warmup,
            "budget_s_per_method": budget,
            "max_total_bytes": int(max_total),
            "quick": args.quick,
            "contended_busy_processes": n_busy,
            "grid": [list(g) for g in grid],
            "skipped": [list(g) for g in skipped],
            "elapsed_s": round(elapsed, 1),
        },
        "definitions": {
            "gbps": "payload bytes (sum of tensor bytes, counted once) / median time / 1e9",
            "gbps_best": "the same with the best (minimum) time",
            "ratio_to_copy": "gbps / gbps of one contiguous copy_ of the same total bytes, same run",
            "timing": (
                "cuda: torch.cuda.Event around each call on an idle, synchronized GPU (host work "
                "inside the call is included); cpu: time.perf_counter around each call. An op's methods "
                "run side by side in rounds: per round and method, warmup unmeasured calls then 3 timed ones"
            ),
            "launches_expected": "known/estimated number of kernels or ops per call, not measured",
            "launches_measured": "cuda only: kernels/memcpy/memset counted by torch.profiler for one call",
            "zero_copy": (
                "true when the result shares storage with an input (torch's "
                "_flatten_dense_tensors of ONE tensor returns a view): its gbps is meaningless"
            ),
            "methods": {
                "flatten/zerocomm": "zerocomm.flatten(ts, out=flat, layout=layout)",
                "flatten/zerocomm_alloc": "zerocomm.flatten(ts, layout=layout) (allocates a zeroed buffer)",
                "flatten/cat": "torch._utils._flatten_dense_tensors(ts) (allocates)",
                "flatten/cat_out": "torch.cat([t.view(-1)], out=flat)",
                "flatten/foreach": "torch._foreach_copy_(views of flat, ts)",
                "unflatten/zerocomm": "zerocomm.unflatten(flat, ts, layout=layout)",
                "unflatten/cat": "_unflatten_dense_tensors(flat, ts) then t.copy_(v) per tensor",
                "unflatten/foreach": "torch._foreach_copy_(ts, views of flat)",
                "unflatten/split_copy": "torch.split_with_sizes_copy(flat, sizes, out=[t.view(-1)])",
            },
        },
        "headline": {
            "case": "1000 x 4KB flatten",
            "zerocomm_gbps": hz["gbps"],
            "zerocomm_alloc_gbps": hza["gbps"],
            "cat_gbps": hc["gbps"],
            "ratio_zerocomm_to_cat": ratio,
            "foreach_gbps": hf["gbps"],
            "copy_gbps": copies[HEADLINE[0] * HEADLINE[1]]["gbps"],
        },
        "cpu_thread_scaling": scaling,
        "contended_check": check,
        "copy_baseline": [copies[k] for k in sorted(copies)],
        "results": rows,
    }
    json_path.write_text(json.dumps(doc, indent=1))
    plot(
        rows,
        copies,
        png_path,
        f"flatten / unflatten fp32 on {info['device_name']} ({device}"
        + (f", beside {n_busy} busy process" if n_busy else "")
        + f"), torch {info['torch_version']}",
    )
    print(f"\nwrote {json_path}\nwrote {png_path}\n({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
