"""The benchmark's flags (the package docstring is the --help text)."""

from __future__ import annotations

import argparse

from . import __doc__ as _BENCHMARK_DOC

REAL_VARIANTS = ["zero_torch", "seed_bcast", "zc_broadcast", "zc_allgather", "ddp", "ds_zero1", "ds_zero2"]
SIM_VARIANTS = ["sim_blocking", "sim_zc_broadcast", "sim_zc_allgather"]
# --quick: what the GPU suite needs to show (real NCCL in both modes; overlap
# against the blocking baseline) on a model that builds in about a second.
QUICK_VARIANTS = ["zc_broadcast", "zc_allgather", "sim_zc_allgather", "sim_blocking"]
QUICK_SIZE = {"dim": 512, "layers": 6, "heads": 8, "seq": 256, "vocab": 4096, "steps": 12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=_BENCHMARK_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--world-size", type=int, default=2, help="CPU ranks to spawn (ignored under torchrun)")
    ap.add_argument("--dim", type=int, default=None, help="model width (default 256 cpu, 1024 cuda)")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default 6 cpu, 12 cuda)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default 4 cpu, 16 cuda)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 64 cpu, 512 cuda)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 256 cpu, 8192 cuda)")
    ap.add_argument(
        "--steps", type=int, default=None, help="steps per variant, warm-up included (default 36 cpu, 30 cuda)"
    )
    ap.add_argument(
        "--round-steps",
        type=int,
        default=6,
        help="the real variants run in interleaved rounds of this many steps each (round 0: warm-up); "
        "a variant run alone (simulated) runs all its steps in one round",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unmeasured steps at the start of each interleaved round (a variant run alone skips its first 4)",
    )
    ap.add_argument(
        "--bucket-mb",
        type=float,
        default=4.0,
        help="zerocomm bucket cap in MiB (default: each TinyGPT block of the CPU size, 3 MiB, gets its own bucket)",
    )
    ap.add_argument(
        "--sim-bucket-mb",
        type=float,
        default=1.0,
        help="zerocomm bucket cap of the simulated variants (broadcast buckets do not follow block "
        "boundaries: finer ones keep each block's wait to little more than its own parameters)",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--transport",
        choices=["all", "real", "simulated"],
        default="all",
        help="real: the five real-transport variants; simulated: zerocomm on "
        "SimulatedTransport + blocking baseline; all: both (default)",
    )
    ap.add_argument(
        "--variants", default=None, help="comma-separated subset of " + ",".join(REAL_VARIANTS + SIM_VARIANTS)
    )
    ap.add_argument("--sim-latency-us", type=float, default=20.0)
    ap.add_argument(
        "--sim-bandwidth-gbps", type=float, default=None, help="fixed simulated bandwidth (GB/s); implies --no-auto-sim"
    )
    ap.add_argument(
        "--auto-sim",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibrate the simulated bandwidth so one step's param sync ~= the forward pass",
    )
    ap.add_argument("--sim-world", type=int, default=8, help="modelled world size of the simulated ring")
    ap.add_argument(
        "--sim-ranks",
        choices=["one", "all"],
        default="one",
        help="simulated runs on rank 0 only (default: the other ranks' compute would "
        "compete for this machine's cores) or on every rank at once",
    )
    ap.add_argument(
        "--sim-extra-layers",
        type=int,
        default=24,
        help="also run sim allgather on a model with this many layers (0: off) "
        "to show how exposure scales with the number of blocks",
    )
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the GPU suite's size (benchmarks/gpu_suite.sh, < 40 s): variants "
        + ",".join(QUICK_VARIANTS)
        + " (NCCL both modes; zerocomm against the blocking baseline on a simulated wire ~= forward), "
        "no extra-layers run, on CUDA a smaller model (flags given explicitly still win), 12 steps",
    )
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if args.quick:
        for name, value in QUICK_SIZE.items():
            if getattr(args, name) is None and (cuda or name == "steps"):
                setattr(args, name, value)
        args.variants = args.variants or ",".join(QUICK_VARIANTS)
        args.sim_extra_layers = 0
    for name, cpu_v, cuda_v in (
        ("dim", 256, 1024),
        ("layers", 6, 12),
        ("heads", 4, 16),
        ("seq", 64, 512),
        ("vocab", 256, 8192),
        ("steps", 36, 30),
    ):
        if getattr(args, name) is None:
            setattr(args, name, cuda_v if cuda else cpu_v)
    if args.sim_bandwidth_gbps is not None:
        args.auto_sim = False
    if args.round_steps < args.warmup + 2:
        ap.error("--round-steps must be at least --warmup + 2 (a measured step and the step closing it)")
    if args.steps < 2 * args.round_steps:
        ap.error("--steps must be at least 2 * --round-steps (round 0 is warm-up)")
    if args.variants:
        bad = set(args.variants.split(",")) - set(REAL_VARIANTS + SIM_VARIANTS)
        if bad:
            ap.error(f"unknown variants: {sorted(bad)}")
    return args
