"""Memory of one data-parallel training step: zerocomm beside DDP, torch's
ZeroRedundancyOptimizer, FSDP2 and DeepSpeed, in one run.

    python benchmarks/memory.py                      # CPU, gloo: 2 and 4 ranks, fp32 and bf16 (~10 min)
    python benchmarks/memory.py --world-sizes 2 --dtypes fp32 --params-m 20
    torchrun --nproc-per-node 2 benchmarks/memory.py --device cuda   # torch.cuda.max_memory_allocated

The model: `--blocks` residual MLP blocks (Linear(d, 4d), GELU, Linear(4d, d)),
d chosen for `--params-m` million parameters (12 blocks, d=1024: 100.7M), AdamW,
3 steps of a tiny batch (activations are negligible beside the model state).
Every variant runs in fresh processes: the model is built, the baseline taken,
then the variant set up and trained.

Per variant and rank, in units of the model's parameter bytes (P):
  peak    the highest resident memory above the built model, from the start of the
          variant's setup to the end of its last step
  state   resident memory above the built model after the last step(), plus the
          parameters themselves: the model state (parameters, gradients, optimizer
          state, masters, communication buffers), in bytes per parameter
  steady  above the built model after the last zero_grad()
  tensors the model state counted from the live tensors' storages at the same point
          as `state` (no allocator or runtime overhead; C++-only buffers unseen)
The table gives the worst rank. `floor` is the analytic model state of each scheme
above the model (fp32, N ranks: DDP 1 gradient + 1 bucket copy + 2 Adam = 4P,
ZeRO-1 1 + 2/N, ZeRO-2 3/N; FSDP shards parameters too).

CPU: anonymous resident memory (RssAnon; the file-backed rest is libtorch's code).
glibc serves big allocations from mmap only below a dynamic threshold that rises
(up to 32 MiB) each time such a block is freed; after that, freed tensors go back
to the heap and stay resident, so RSS would keep the high-water mark of everything
ever freed and "steady" would mean nothing.
MALLOC_MMAP_THRESHOLD_=65536 pins the threshold (set here, for the spawned ranks),
so every tensor above 64 KiB is its own mapping, returned to the system when
freed. The peak is the kernel's VmHWM, reset to the current RSS before the
variant starts by writing "5" to /proc/self/clear_refs.
CUDA: torch.cuda.memory_allocated / max_memory_allocated (reset_peak_memory_stats).
Results: benchmarks/results/<device>/memory_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

# must be in the environment before the ranks start (glibc reads it at startup)
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zerocomm.testing.launch import run_env_rank, spawn_gloo_ranks, under_torchrun  # noqa: E402

STEPS = 3
BATCH = 4
MIB = 1 << 20


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Model(nn.Module):
    def __init__(self, d: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def width_for(params_m: float, blocks: int) -> int:
    """d with blocks * (8 d^2 + 5 d) closest to params_m million, a multiple of 64."""
    d = math.sqrt(params_m * 1e6 / (8 * blocks))
    return max(64, int(round(d / 64)) * 64)


# -- measuring ----------------------------------------------------------------
class Meter:
    """Bytes in use now and at the peak since reset(): RSS on CPU, the caching
    allocator's allocated bytes on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> int:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return self._status("RssAnon")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        # VmHWM counts file-backed pages too: libtorch's code pages, faulted in by
        # the first use of each kernel (~2.4x the parameter bytes of a 20M model
        # for AdamW's first step alone). They only grow, so the high-water mark
        # less the file pages at the end is the anonymous peak, exactly when
        # the peak comes after the code it runs was first used (steps 2-3 repeat
        # step 1), and at most the code pages of the peak's own step low otherwise.
        return self._status("VmHWM") - self._status("RssFile") - self._status("RssShmem")

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")


# -- the variants ---------------------------------------------------------------
# each: (model, rank, world, cfg) -> (forward module, step fn, zero_grad fn)
Setup = Callable[[nn.Module, dict], tuple[Callable, Callable[[], None], Callable[[], None]]]


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


def _zerocomm(mode: str, **opts: Any) -> Setup:
    def setup(model: nn.Module, cfg: dict) -> tuple[Callable, Callable[[], None], Callable[[], None]]:
        import zerocomm

        if cfg["dtype"] == "bf16":
            opts.setdefault("master_dtype", torch.float32)
        zopt = zerocomm.attach(model, _adamw(model.parameters()), mode=mode, **opts)
        return model, zopt.step, zopt.zero_grad

    return setup


def _ddp(view: bool) -> Setup:
    def setup(model: nn.Module, cfg: dict) -> tuple[Callable, Callable[[], None], Callable[[], None]]:
        ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=view)
        opt = _adamw(model.parameters())
        return ddp, opt.step, opt.zero_grad

    return setup


def _zero_redundancy(model: nn.Module, cfg: dict) -> tuple[Callable, Callable[[], None], Callable[[], None]]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    ddp = nn.parallel.DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4, weight_decay=0.1)
    return ddp, opt.step, opt.zero_grad


def _fsdp2(reshard: bool) -> Setup:
    def setup(model: nn.Module, cfg: dict) -> tuple[Callable, Callable[[], None], Callable[[], None]]:
        from torch.distributed.fsdp import fully_shard

        for b in model.blocks:  # type: ignore[union-attr]
            fully_shard(b, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        opt = _adamw(model.parameters())
        return model, opt.step, opt.zero_grad

    return setup


def _deepspeed(stage: int) -> Setup:
    def setup(model: nn.Module, cfg: dict) -> tuple[Callable, Callable[[], None], Callable[[], None]]:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg["device"] == "cuda" else "cpu")
        os.environ.setdefault("DS_BUILD_OPS", "0")
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": BATCH,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
        }
        if cfg["dtype"] == "bf16":
            config["bf16"] = {"enabled": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=_adamw(model.parameters()), config=config)

        def step() -> None:
            engine.step()

        fwd = engine
        fwd.backward_fn = engine.backward  # type: ignore[attr-defined]
        return fwd, step, lambda: None

    return setup


VARIANTS: dict[str, tuple[Setup, str]] = {
    # name: (setup, floor key)
    "zc_broadcast": (_zerocomm("broadcast"), "zero1"),
    "zc_allgather": (_zerocomm("allgather"), "zero1"),
    "zc_allgather_zero2": (_zerocomm("allgather", shard_grads=True), "zero2"),
    "ddp": (_ddp(False), "ddp"),
    "ddp_bucket_view": (_ddp(True), "ddp_view"),
    "zero_redundancy": (_zero_redundancy, "torch_zero"),
    "fsdp2_reshard_false": (_fsdp2(False), "fsdp"),
    "fsdp2_reshard_true": (_fsdp2(True), "fsdp"),
    "ds_zero1": (_deepspeed(1), "ds_zero1"),
    "ds_zero2": (_deepspeed(2), "ds_zero2"),
}
BF16_VARIANTS = ("zc_broadcast", "zc_allgather", "zc_allgather_zero2", "ddp", "ds_zero1", "ds_zero2")


def floor(key: str, world: int, dtype: str) -> float | None:
    """Analytic model state above the model, in units of the parameter bytes
    (AdamW: 2 state tensors per parameter, in the parameter's dtype or fp32)."""
    n = world
    if dtype == "bf16":  # bf16 parameters and gradients; fp32 masters + fp32 Adam = 6 x param bytes, sharded
        # (ZeRO-1: Megatron's 4 + 12/N bytes per parameter, less the parameters' 2)
        return {
            "zero1": 1 + 6 / n,
            "zero2": 7 / n,
            "ddp": 1 + 1 + 2,
            "ds_zero1": 1 + 6 / n,
            "ds_zero2": 7 / n,
        }.get(key)
    return {
        "zero1": 1 + 2 / n,
        "zero2": 3 / n,
        "ddp": 4.0,
        "ddp_view": 3.0,
        "torch_zero": 2 + 2 / n,
        "fsdp": 4 / n - 1,
        "ds_zero1": 1 + 3 / n,
        "ds_zero2": 4 / n,
    }.get(key)


def deepspeed_missing() -> str | None:
    try:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed not installed (requirements-bench.txt)"
    except Exception as e:  # pragma: no cover
        return str(e)
    return None


# -- one variant on one rank -------------------------------------------------------
def warm_up(cfg: dict) -> None:
    """What every variant's first use would otherwise count as its own memory:
    the Python modules it imports (the first optimizer step imports
    torch._dynamo: ~77 MiB of heap) and a tiny AdamW step."""
    p = nn.Parameter(torch.zeros(8))
    p.grad = torch.ones(8)
    _adamw([p]).step()
    import importlib

    for name in ("torch.distributed.fsdp", "torch.distributed.optim", "zerocomm.api"):
        importlib.import_module(name)

    if cfg["variant"].startswith("ds_"):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg["device"] == "cuda" else "cpu")
        os.environ.setdefault("DS_BUILD_OPS", "0")
        importlib.import_module("deepspeed")


def tensor_bytes() -> int:
    """Bytes of every distinct storage a live Python tensor holds: the model
    state exactly, without the allocator's and the runtime's overhead (gloo
    buffers, the interpreter's heap) that the resident-memory figures carry,
    DDP included. Storage held only inside C++ (DDP's reducer buckets) is not
    seen here; zerocomm hands every buffer it allocates to Python."""
    sizes: dict[int, int] = {}
    for o in gc.get_objects():
        if not issubclass(type(o), torch.Tensor):  # type(): no __class__ lookup on lazy module objects
            continue
        try:
            st = o.untyped_storage()
            ptr = st.data_ptr()
        except RuntimeError:  # a tensor without storage (a HandedOver marker)
            continue
        if ptr:
            sizes[ptr] = max(sizes.get(ptr, 0), st.nbytes())
    return sum(sizes.values())


def rank_job(rank: int, world: int, cfg: dict) -> dict:
    device = torch.device(cfg["device"], rank % max(1, torch.cuda.device_count())) if cfg["device"] == "cuda" else None
    device = device or torch.device("cpu")
    meter = Meter(device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cfg["dtype"] == "bf16" else torch.float32
    model = Model(cfg["d"], cfg["blocks"]).to(device=device, dtype=dtype)
    numel = sum(p.numel() for p in model.parameters())
    pbytes = numel * dtype.itemsize
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randn(BATCH, cfg["d"], generator=g).to(device=device, dtype=dtype) for _ in range(STEPS)]
    warm_up(cfg)
    dist.barrier()
    base = meter.now()
    meter.reset()
    setup, _ = VARIANTS[cfg["variant"]]
    fwd, step, zero_grad = setup(model, cfg)
    state = steady = tensors = 0
    for x in batches:
        loss = fwd(x).float().pow(2).mean()
        backward = getattr(fwd, "backward_fn", None)
        backward(loss) if backward is not None else loss.backward()
        step()
        state = meter.now()
        tensors = tensor_bytes() - sum(b.untyped_storage().nbytes() for b in batches)
        zero_grad()
        steady = meter.now()
    peak = meter.peak()
    dist.barrier()
    return {
        "rank": rank,
        "numel": numel,
        "param_bytes": pbytes,
        "baseline_bytes": base,
        "peak_above": peak - base,
        "state_above": state - base,
        "steady_above": steady - base,
        "tensor_state": tensors,
        "loss": float(loss.detach()),
    }


def run_variant(name: str, world: int, dtype: str, args: argparse.Namespace) -> dict:
    cfg = {
        "variant": name,
        "dtype": dtype,
        "device": args.device,
        "d": width_for(args.params_m if world == 2 else args.params_m_4, args.blocks),
        "blocks": args.blocks,
    }
    if args.device == "cuda":
        ranks = [run_env_rank(rank_job, (cfg,), "nccl")]
    else:
        ranks = spawn_gloo_ranks(rank_job, world, (cfg,), timeout_s=args.timeout, cpu_threads=1)
    worst = max(ranks, key=lambda r: r["peak_above"])
    pb = worst["param_bytes"]
    per = worst["param_bytes"] / worst["numel"]  # bytes per parameter of the model's dtype
    fl = floor(VARIANTS[name][1], world, dtype)
    return {
        "variant": name,
        "world": world,
        "dtype": dtype,
        "params": worst["numel"],
        "peak_x": max(r["peak_above"] for r in ranks) / pb,
        "state_x": max(r["state_above"] for r in ranks) / pb + 1,
        "steady_x": max(r["steady_above"] for r in ranks) / pb,
        "state_bytes_per_param": (max(r["state_above"] for r in ranks) + pb) / worst["numel"],
        "tensor_state_bytes_per_param": max(r["tensor_state"] for r in ranks) / worst["numel"],
        "floor_x": fl,
        "param_dtype_bytes": per,
        "ranks": ranks,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["world"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4.5), squeeze=False)
    for ax, (world, dtype) in zip(axes[0], configs):
        sel = [r for r in rows if r["world"] == world and r["dtype"] == dtype and "error" not in r]
        names = [r["variant"] for r in sel]
        y = range(len(sel))
        ax.barh(list(y), [r["peak_x"] for r in sel], color="#9ecae1", label="peak")
        ax.barh(list(y), [r["steady_x"] for r in sel], color="#3182bd", height=0.5, label="steady")
        for i, r in enumerate(sel):
            if r["floor_x"] is not None:
                ax.plot([r["floor_x"]] * 2, [i - 0.4, i + 0.4], color="k", lw=2)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{world} ranks, {dtype}")
        ax.set_xlabel("memory above the model / parameter bytes (| = floor)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--params-m", type=float, default=100.0, help="model size at 2 ranks (millions)")
    ap.add_argument(
        "--params-m-4", type=float, default=50.0, help="model size at more ranks (RAM: every rank holds the model)"
    )
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_dir = Path(args.out or Path(__file__).parent / "results" / args.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_missing = deepspeed_missing()
    rows: list[dict] = []
    worlds = [int(os.environ["WORLD_SIZE"])] if under_torchrun() else args.world_sizes
    for world in worlds:
        for dtype in args.dtypes:
            for name in args.variants:
                if dtype == "bf16" and name not in BF16_VARIANTS:
                    continue
                if name.startswith("ds_") and ds_missing:
                    rows.append({"variant": name, "world": world, "dtype": dtype, "error": ds_missing})
                    continue
                t = time.monotonic()
                try:
                    row = run_variant(name, world, dtype, args)
                except Exception as e:  # one variant failing must not lose the run
                    msg = (str(e).strip().splitlines() or [""])[-1][:300]
                    row = {"variant": name, "world": world, "dtype": dtype, "error": f"{type(e).__name__}: {msg}"}
                row["seconds"] = round(time.monotonic() - t, 1)
                rows.append(row)
                if "error" in row:
                    print(f"{world} ranks {dtype:4s} {name:22s} FAILED: {row['error']}", flush=True)
                else:
                    fl = "-" if row["floor_x"] is None else f"{row['floor_x']:.2f}"
                    print(
                        f"{world} ranks {dtype:4s} {name:22s} peak {row['peak_x']:5.2f}x  steady "
                        f"{row['steady_x']:5.2f}x  state {row['state_bytes_per_param']:5.2f} B/param "
                        f"(tensors {row['tensor_state_bytes_per_param']:5.2f})  floor {fl}",
                        flush=True,
                    )
    meta = {
        "device": args.device,
        "torch": torch.__version__,
        "steps": STEPS,
        "batch": BATCH,
        "blocks": args.blocks,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    path = out_dir / f"memory_{args.device}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    try:
        plot(rows, out_dir / f"memory_{args.device}.png")
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
