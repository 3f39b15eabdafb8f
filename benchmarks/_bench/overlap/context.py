"""What every variant shares on one rank: the model, the data, the optimizer
settings, the hand-written grad all-reduce and a few small helpers."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .timers import Clock, Memory


def state_bytes(optim: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer-state tensors (dim > 0: not AdamW's scalar step)."""
    return sum(
        v.numel() * v.element_size()
        for s in optim.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


def lm_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = module(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


class Ctx:
    """One rank's benchmark state, handed to every runner."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.cuda = device.type == "cuda"
        # the group zerocomm and the sim collectives use (None: world); the simulated
        # variants may run on a subgroup (--sim-ranks one)
        self.group: dist.ProcessGroup | None = None
        self.group_size = world
        # the bucket cap zerocomm plans with: --bucket-mb, or --sim-bucket-mb while the
        # simulated variants run
        self.bucket_mb: float = args.bucket_mb
        self.clock = Clock(self.cuda)
        self.mem = Memory(self.cuda)
        self._batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_model(self, layers: int | None = None) -> nn.Module:
        from zerocomm.testing.models import TinyGPT

        a = self.args
        return TinyGPT(vocab=a.vocab, dim=a.dim, n_layers=layers or a.layers, n_heads=a.heads, seq=a.seq).to(
            self.device
        )

    def adamw(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.args.lr, weight_decay=0.1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A learnable synthetic language (as zerocomm.demo): x[t+1] = (a*x[t] + 1) % vocab."""
        if step not in self._batches:
            a = self.args
            g = torch.Generator().manual_seed(step * 1000 + self.rank)
            start = torch.randint(0, a.vocab, (a.batch, 1), generator=g)
            mul = torch.randint(1, 4, (a.batch, 1), generator=g)
            seq = [start]
            for _ in range(a.seq):
                seq.append((seq[-1] * mul + 1) % a.vocab)
            s = torch.cat(seq, dim=1).to(self.device)
            self._batches[step] = (s[:, :-1], s[:, 1:])
        return self._batches[step]

    def allreduce_grads(self, params: list[nn.Parameter]) -> None:
        """Hand-written grad all-reduce + average (one flat buffer) for (a) and (b)."""
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.world)
        for g, v in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(v)


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters, a tied one once (TinyGPT ties the head to the embedding)."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def allreduce_mean(ctx: Ctx, *xs: float) -> list[float]:
    """Each x averaged over ctx.group."""
    t = torch.tensor(xs, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, group=ctx.group)
    return (t / ctx.group_size).tolist()
