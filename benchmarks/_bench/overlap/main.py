"""Entry point: parse the flags, start the ranks, run the benchmark on each."""

from __future__ import annotations

import os
import time

import torch

from zerocomm.testing import launch

from .cli import parse_args
from .driver import run_all


def main(argv: list[str] | None = None) -> None:
    """CUDA: one NCCL rank per torchrun process, or a one-rank group under plain python.
    CPU: gloo ranks from torchrun, or --world-size ranks spawned here."""
    t_start = time.time()
    args = parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        if not launch.under_torchrun():
            launch.set_single_rank_env()
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        launch.run_env_rank(run_all, (args, device, t_start), "nccl", device=device)
        return
    cpu = torch.device("cpu")
    if launch.under_torchrun():
        launch.run_env_rank(run_all, (args, cpu, t_start), "gloo", cpu_threads=1)
        return
    launch.spawn_gloo_ranks(run_all, args.world_size, (args, cpu, t_start))
    print(f"total wall time {time.time() - t_start:.0f} s", flush=True)
