"""PyTorch Lightning (issue 20, item 4): `configure_optimizers` returning
`zerocomm.attach(self, opt)` under `ZeroDDPStrategy` on 2 CPU processes,
with `gradient_clip_val` by norm and by value, in both modes, ends where the
same training with plain AdamW and torch's clipping in one process ends
(max |delta| < 1e-5, ranks bitwise equal). Skipped without pytorch-lightning."""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest
import torch
import torch.nn as nn
from dist_utils import run_ranks

pl = pytest.importorskip("pytorch_lightning")

WORLD = 2
STEPS = 5
MODES = ("broadcast", "allgather")
CLIPS = (("norm", 0.5), ("value", 0.02))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


def _reference(algorithm: str | None, clip: float) -> dict[str, torch.Tensor]:
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        loss = sum(((net(x) - y) ** 2).mean() for x, y in (_batch(step, r) for r in range(WORLD))) / WORLD
        loss.backward()
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        elif algorithm == "value":
            torch.nn.utils.clip_grad_value_(net.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _lightning(rank: int, mode: str, algorithm: str, clip: float) -> dict[str, torch.Tensor]:
    import zerocomm
    from zerocomm.integrations.lightning import ZeroDDPStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: torch.Tensor, idx: int) -> torch.Tensor:
            x, y = _batch(int(batch.item()), self.global_rank)
            return ((self(x) - y) ** 2).mean()

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
            return zerocomm.attach(self, opt, mode=mode, bucket_mb=0.002)

    # the ranks are this test's processes (process group already up): Lightning
    # takes them as externally launched
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD), NODE_RANK="0")
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ZeroDDPStrategy(),
        max_steps=STEPS,
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = torch.utils.data.DataLoader(torch.arange(STEPS), batch_size=None)
    trainer.fit(module, data)
    zopt = trainer.optimizers[0]
    zopt.synchronize()
    out = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    zopt.close()
    return out


def _job(rank: int, world: int) -> dict:
    return {(m, a): _lightning(rank, m, a, c) for m in MODES for a, c in CLIPS}


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_ranks(_job, WORLD, timeout=300)


@pytest.mark.parametrize("algorithm,clip", CLIPS)
@pytest.mark.parametrize("mode", MODES)
def test_lightning_clipping_is_exact(mode: str, algorithm: str, clip: float) -> None:
    want = _reference(algorithm, clip)
    res = [r[mode, algorithm] for r in _results()]
    for r in range(WORLD):
        worst = max((res[r][n] - want[n]).abs().max().item() for n in want)
        assert worst < 1e-5, f"{mode} clip by {algorithm}, rank {r}: max |delta| {worst:.3g} against plain torch"
    assert all(torch.equal(res[0][n], res[1][n]) for n in want), f"{mode} {algorithm}: ranks differ"
    unclipped = _reference(None, 0.0)
    assert max((unclipped[n] - want[n]).abs().max().item() for n in want) > 1e-3, "clipping changes nothing"
