"""gloo collectives on CPU: what one call costs (wall and CPU time of the whole
process, gloo's threads included), for the collectives zerocomm issues and the
ways it could build them ([Note: gloo reduce-scatter], csrc/c10d_communicator.cpp).

    python benchmarks/collectives.py                   # 2 and 4 ranks, ~1 min on 2 cores
    python benchmarks/collectives.py --world-sizes 2

Per world size and buffer size (the whole bucket; each rank's shard is 1/W):
  all_reduce        dist.all_reduce(flat)
  reduce_scatter    dist.reduce_scatter_tensor(shard, flat)  (gloo's reduce_scatter_single)
  rs_allreduce      all_reduce(flat), then this rank's slice copied out
  rs_reduces        W rooted reduces, slice r onto rank r (async, then waited)
  all_gather        dist.all_gather_into_tensor(flat, shard)
  ag_broadcasts     W broadcasts, slice r from rank r
Median over the calls after warm-up, each call between two barriers; rank 0's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

from zerocomm.testing import launch  # noqa: E402

MIB = 1 << 20


def _methods(flat: torch.Tensor, shard: torch.Tensor, rank: int, world: int) -> dict[str, Callable[[], None]]:
    h = shard.numel()

    def rs_allreduce() -> None:
        dist.all_reduce(flat)
        shard.copy_(flat.narrow(0, rank * h, h))

    def rs_reduces() -> None:
        works = [dist.reduce(flat.narrow(0, r * h, h), r, async_op=True) for r in range(world)]
        for w in works:
            w.wait()
        shard.copy_(flat.narrow(0, rank * h, h))

    def ag_broadcasts() -> None:
        flat.narrow(0, rank * h, h).copy_(shard)
        works = [dist.broadcast(flat.narrow(0, r * h, h), r, async_op=True) for r in range(world)]
        for w in works:
            w.wait()

    return {
        "all_reduce": lambda: dist.all_reduce(flat),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, flat),
        "rs_allreduce": rs_allreduce,
        "rs_reduces": rs_reduces,
        "all_gather": lambda: dist.all_gather_into_tensor(flat, shard),
        "ag_broadcasts": ag_broadcasts,
    }


def measure(rank: int, world: int, sizes_mib: list[float], calls: int) -> list[dict]:
    rows = []
    for mib in sizes_mib:
        n = int(mib * MIB) // 4 // world * world
        flat, shard = torch.randn(n), torch.empty(n // world)
        for name, fn in _methods(flat, shard, rank, world).items():
            wall, cpu = [], []
            for _ in range(calls):
                dist.barrier()
                c, t = time.process_time(), time.perf_counter()
                fn()
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            k = calls // 8  # warm-up
            rows.append(
                {
                    "world": world,
                    "mib": mib,
                    "method": name,
                    "wall_ms": statistics.median(wall[k:]) * 1e3,
                    "cpu_ms": statistics.median(cpu[k:]) * 1e3,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--sizes-mib", default="1,3")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for w in (int(x) for x in args.world_sizes.split(",")):
        sizes = [float(x) for x in args.sizes_mib.split(",")]
        rows += launch.spawn_gloo_ranks(measure, w, (sizes, args.calls), timeout_s=600)[0]
    print(f"{'world':>5} {'MiB':>5} {'method':16s} {'wall ms':>8} {'cpu ms':>8}")
    for r in rows:
        print(f"{r['world']:>5} {r['mib']:>5g} {r['method']:16s} {r['wall_ms']:8.2f} {r['cpu_ms']:8.2f}")
    doc = {"benchmark": "collectives", "machine": machine_info("cpu"), "config": vars(args), "results": rows}
    path = out / "collectives_cpu.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
