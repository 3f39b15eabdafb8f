"""The main job: train a small GPT-style model with zerocomm on N ranks.

    python -m zerocomm.demo                      # 2 gloo ranks on CPU
    python -m zerocomm.demo --world-size 4 --mode allgather
    torchrun --nproc-per-node 8 -m zerocomm.demo # NCCL on GPUs

Ends with a report: step time, optimizer memory per rank vs unsharded, total
and exposed parameter-sync time (measured by zerocomm's telemetry).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from .launch import run_env_rank, spawn_gloo_ranks, under_torchrun


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2, help="CPU ranks to spawn (ignored under torchrun)")
    ap.add_argument("--mode", choices=["broadcast", "allgather"], default="allgather")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--bucket-mb", type=float, default=0.5)
    return ap.parse_args(argv)


def batch(step: int, rank: int, args: argparse.Namespace, vocab: int, device: torch.device):
    """A learnable synthetic language: each sequence follows x[t+1] = (a*x[t] + c) % vocab."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    start = torch.randint(0, vocab, (args.batch, 1), generator=g)
    a = torch.randint(1, 4, (args.batch, 1), generator=g)
    seq = [start]
    for _ in range(args.seq):
        seq.append((seq[-1] * a + 1) % vocab)
    s = torch.cat(seq, dim=1).to(device)
    return s[:, :-1], s[:, 1:]


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    import zerocomm
    from zerocomm.testing.models import TinyGPT

    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    vocab = 256
    model = TinyGPT(vocab=vocab, dim=args.dim, n_layers=args.layers, n_heads=4, seq=args.seq, init_std=0.02).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups: list[dict[str, Any]] = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    unsharded_state = 2 * sum(p.numel() * 4 for p in model.parameters())  # AdamW: exp_avg + exp_avg_sq
    zopt = zerocomm.attach(model, opt, mode=args.mode, bucket_mb=args.bucket_mb)
    if rank == 0:
        print(zopt.plan.summary(), flush=True)
    bar = None
    if rank == 0:
        try:  # an optional dependency (pip install zerocomm[demo])
            from tqdm import tqdm

            bar = tqdm(total=args.steps, desc=f"zerocomm {args.mode} x{world}", unit="step")
        except ImportError:
            pass
    times, first_loss, loss = [], None, None
    for step in range(args.steps):
        if step == 3:
            zopt.enable_tracing()  # after warm-up
        t0 = time.perf_counter()
        x, y = batch(step, rank, args, vocab, device)
        loss = model.loss(x, y)
        loss.backward()
        zopt.step()
        zopt.zero_grad()
        if cuda:
            # The compute stream only: a device-wide synchronize() would also
            # wait for zerocomm's comm stream every step, so the next forward
            # could never overlap the sync and "exposed" would be 0 by
            # construction.
            torch.cuda.current_stream().synchronize()
        times.append(time.perf_counter() - t0)
        first_loss = first_loss if first_loss is not None else loss.item()
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    zopt.synchronize()
    if bar is not None:
        bar.close()
    stats = zopt.stats()
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in zopt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    mine = torch.tensor([state_bytes, stats["sync_total_s"], stats["sync_exposed_s"]], dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine.to(device) if cuda else mine)
    if rank == 0:
        measured = times[3:] or times
        print("\nzerocomm demo report")
        print(f"  ranks x mode            : {world} x {args.mode} ({'NCCL' if cuda else 'gloo, CPU'})")
        assert loss is not None and first_loss is not None  # at least one step ran
        print(f"  loss                    : {first_loss:.3f} -> {loss.item():.3f}")
        print(f"  step time (median)      : {statistics.median(measured) * 1e3:.1f} ms")
        print(
            f"  optimizer state / rank  : {', '.join(f'{e[0].item() / 2**20:.2f}' for e in everyone)} MiB "
            f"(unsharded: {unsharded_state / 2**20:.2f} MiB)"
        )
        total = sum(e[1].item() for e in everyone) / world
        exposed = sum(e[2].item() for e in everyone) / world
        frac = exposed / total if total else 0.0
        print(
            f"  param sync, per rank    : {total * 1e3:.1f} ms total over {len(measured)} steps, "
            f"{exposed * 1e3:.1f} ms exposed ({frac:.0%} of it made the forward wait)"
        )
    zopt.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if under_torchrun():
        run_env_rank(train, (args,), "nccl" if torch.cuda.is_available() else "gloo")
    else:
        spawn_gloo_ranks(train, args.world_size, (args,))


if __name__ == "__main__":
    main()
