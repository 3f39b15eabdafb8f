"""Run a function on N gloo ranks in fresh processes, with a hard timeout."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
import torch.nn as nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = {"ok": fn(rank, world, *args)}
    except BaseException as e:  # reported to the parent, which raises
        result = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__, "traceback": traceback.format_exc()}
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    from zerocomm.testing.launch import exit_rank

    exit_rank()  # [Note: rank exit] in zerocomm/testing/launch.py


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 120.0, expect_errors: bool = False) -> list[Any]:
    """Returns each rank's return value; raises if a rank failed (unless
    expect_errors, then returns the per-rank result dicts) or the job hung."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_entry, args=(r, world, port, fn, args, out_dir), daemon=True) for r in range(world)
        ]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                results.append({"error": "no result (hung or crashed)", "type": "Hang"})
            # how the process ended: fault tests assert nobody had to be killed
            results[-1].update(exitcode=procs[r].exitcode, killed=r in hung, alive=procs[r].is_alive())
    if hung and not expect_errors:
        raise TimeoutError(f"ranks {hung} did not finish within {timeout} s")
    if expect_errors:
        return results
    errors = [f"rank {r}: {res.get('traceback', res['error'])}" for r, res in enumerate(results) if "error" in res]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [res["ok"] for res in results]


def tiny_mlp() -> nn.Module:
    """A 3-layer MLP with fixed initial weights, the same on every rank and process."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def tiny_mlp_loss(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    """The loss of `tiny_mlp` on this rank's batch of this step (seeded by both)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
    return ((model(x) - y) ** 2).mean()


def tiny_llama() -> nn.Module:
    """A 2-layer HF Llama from a small config (no download), with fixed
    initial weights; needs transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)
