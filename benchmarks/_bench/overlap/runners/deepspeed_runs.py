"""ds_zero1 and ds_zero2: DeepSpeed's ZeRO stage 1 and 2 engines on the rank's
existing process group, as optional variants (deepspeed is not a dependency:
requirements-bench.txt; deepspeed_available() says why they are skipped).

They train what the other variants train: the same TinyGPT and batches, the plain
torch AdamW of ctx.adamw, fp32, no gradient clipping (DeepSpeed clips to 1.0 by
default), no LR scheduler. DeepSpeed runs on its CPU accelerator with no C++ ops
built (DS_ACCELERATOR=cpu, DS_BUILD_OPS=0); on CUDA it uses its CUDA accelerator."""

from __future__ import annotations

import gc
import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from ..context import Ctx, state_bytes
from .variant import Variant


def _import_deepspeed(accelerator: str) -> Any:
    """deepspeed, imported quietly on `accelerator` (read once, at its first use:
    the environment is set before the import)."""
    os.environ.setdefault("DS_ACCELERATOR", accelerator)
    os.environ.setdefault("DS_BUILD_OPS", "0")
    ext_log = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU hosts
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        import deepspeed
    finally:
        ext_log.setLevel(level)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_available(accelerator: str | None = None) -> str | None:
    """None when deepspeed imports and runs on `accelerator`, else a one-line reason
    to skip the ds_* variants. None: cuda in an NCCL rank (--device cuda), else cpu."""
    if accelerator is None:
        nccl = dist.is_initialized() and "nccl" in str(dist.get_backend())
        accelerator = "cuda" if nccl else "cpu"
    try:
        deepspeed = _import_deepspeed(accelerator)
        from deepspeed.accelerator import get_accelerator
    except Exception as e:  # ImportError, or a broken install failing inside its import
        why = (str(e).splitlines() or [""])[0]
        return f"deepspeed not importable ({type(e).__name__}: {why}): see requirements-bench.txt"
    name = get_accelerator().device_name()
    if name != accelerator:
        return f"deepspeed {deepspeed.__version__} chose accelerator {name!r}, not {accelerator!r} (DS_ACCELERATOR)"
    return None


def ds_config(ctx: Ctx, stage: int) -> dict[str, Any]:
    """fp32 (no fp16/bf16 section), no clipping, one micro-batch per step; every
    other zero_optimization key at DeepSpeed's default (stage 1/2: overlap_comm off,
    contiguous_gradients on, reduce/allgather buckets 5e8 elements)."""
    return {
        "train_micro_batch_size_per_gpu": ctx.args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "wall_clock_breakdown": False,
    }


def make_deepspeed(ctx: Ctx, stage: int) -> Variant:
    deepspeed = _import_deepspeed("cuda" if ctx.cuda else "cpu")
    # the engine reads LOCAL_RANK (torchrun sets it; spawn_gloo_ranks does not): one host
    os.environ.setdefault("LOCAL_RANK", str(ctx.device.index if ctx.cuda else ctx.rank))
    # DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce op (C++, used by
    # its inference all-reduce only, not by training): mark it unbuildable so nothing compiles
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # ZeRO's all_gather_into_tensor calls: torch 2.14 warns once per rank that it is deprecated
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)
    # the group exists (gloo on CPU): deepspeed wraps it instead of initializing one
    deepspeed.init_distributed(dist_backend="nccl" if ctx.cuda else "gloo", verbose=False)
    model = ctx.make_model()
    config = ds_config(ctx, stage)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=ctx.adamw(model.parameters()), config=config)
    # the torch AdamW DeepSpeed steps: its params are this rank's flat fp32 partitions
    inner = getattr(opt, "optimizer", opt)

    def backward(loss: torch.Tensor) -> None:
        # backward, then each grad slice reduced onto the rank that owns its partition, in
        # reduce_bucket_size buckets (ZeRO-2 fills them from grad hooks; this model fits one)
        engine.backward(loss)

    def step(_s: int) -> None:
        # AdamW on this rank's partition, the updated partitions all-gathered into every
        # rank's params, then the ZeRO optimizer's zero_grad (grads set to None)
        engine.step()

    def finish(out: dict[str, Any], measured: list[int]) -> dict[str, Any]:
        out.update(
            opt_state_bytes=state_bytes(inner),
            sync_total_per_step_s=0.0,
            sync_exposed_per_step_s=0.0,
            note=f"DeepSpeed {deepspeed.__version__} ZeRO-{stage}, fp32, client torch AdamW, no clipping, "
            f"zero_optimization defaults (overlap_comm off, contiguous_gradients on, 5e8-element buckets); "
            f"param sync not instrumented: sync figures unknown (0.0), it sits inside step()",
        )
        return out

    def close() -> None:
        # the caller still holds the engine (Variant.module): drop its hooks and the
        # optimizer with its state and fp32 partitions; the model goes with the Variant
        engine.destroy()
        inner.state.clear()
        engine.optimizer = None
        gc.collect()

    return Variant(
        name=f"ds_zero{stage}",
        module=engine,
        backward=backward,
        step=step,
        finish=finish,
        close=close,
        extra={"ds_config": config, "deepspeed_version": deepspeed.__version__},
    )
