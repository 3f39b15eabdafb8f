"""Forwards as users run them under zerocomm: activation checkpointing
(blocks wrapped in `torch.utils.checkpoint.checkpoint`, reentrant and not;
an HF model's gradient checkpointing) and bf16 autocast over fp32
parameters, alone and with checkpointing. The recomputation runs the blocks'
forward again inside backward, so the parameter waits, the gradient hooks
and the handed-over markers all meet a second forward per step; autocast
caches its bf16 copies of the parameters zerocomm syncs in place. Each run
is exact against the plain optimizer (SGD with momentum; AdamW for the HF
model) in one process on the global batch, with the ranks bitwise equal, in
both modes and with ZeRO-2."""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from dist_utils import run_ranks, tiny_llama
from torch.utils.checkpoint import checkpoint

WORLD = 2
STEPS = 5
ATOL = 1e-5
VARIANTS = ("broadcast", "allgather", "zero2")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


# how the forward runs: (checkpointing: None, reentrant or not; bf16 autocast)
HOW = {
    "ckpt_reentrant": (True, False),
    "ckpt": (False, False),
    "autocast": (None, True),
    "autocast_ckpt": (False, True),
}


class Net(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(16, 4)
        self.reentrant, self.autocast = HOW[how]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            for b in self.blocks:
                x = b(x) if self.reentrant is None else checkpoint(b, x, use_reentrant=self.reentrant)
            return self.head(x).float()


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    # requires_grad on the input: reentrant checkpointing needs one to backprop through a block
    return torch.randn(8, 16, generator=g).requires_grad_(), torch.randn(8, 4, generator=g)


def _loss(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    x, y = _batch(step, rank)
    return ((model(x) - y) ** 2).mean()


def _model(how: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net(how)
    # SGD: sensitive to the gradient's scale, which Adam all but normalises away
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)


def _hf_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = tiny_llama()
    # the name newer transformers use; gradient_checkpointing_enable before it
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _hf_loss(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    return model(input_ids=ids, labels=ids).loss


Build = Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
Loss = Callable[[nn.Module, int, int], torch.Tensor]


def _train(rank: int, variant: str, build: Build, loss: Loss, **attach: Any) -> dict[str, torch.Tensor]:
    import zerocomm

    model, opt = build()
    zero2 = variant == "zero2"
    zopt = zerocomm.attach(model, opt, mode="allgather" if zero2 else variant, shard_grads=zero2, **attach)
    for step in range(STEPS):
        loss(model, step, rank).backward()
        zopt.step()
        zopt.zero_grad()
    zopt.synchronize()
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    zopt.close()
    return out


def _job(rank: int, world: int, hf: bool) -> dict[Any, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    out: dict[Any, dict[str, torch.Tensor]] = {}
    for variant in VARIANTS:
        for how in HOW:
            out[variant, how] = _train(rank, variant, functools.partial(_model, how), _loss, bucket_mb=0.001)
        if hf:
            out[variant, "hf"] = _train(rank, variant, _hf_model, _hf_loss)
    return out


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _results() -> list[dict[Any, dict[str, torch.Tensor]]]:
    return run_ranks(_job, WORLD, _has_transformers(), timeout=240)


def _reference(build: Build, loss: Loss) -> dict[str, torch.Tensor]:
    """The plain optimizer, one process, on the mean of the ranks' losses."""
    model, opt = build()
    for step in range(STEPS):
        (sum(loss(model, step, r) for r in range(WORLD)) / WORLD).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check(key: Any, want: dict[str, torch.Tensor], init: nn.Module) -> None:
    moved = max((want[n] - p.detach()).abs().max().item() for n, p in init.named_parameters())
    assert moved > 1e-3, f"{key}: the reference did not train (moved {moved:.3g})"
    res = [r[key] for r in _results()]
    worst = max((res[0][n] - want[n]).abs().max().item() for n in want)
    assert worst < ATOL, f"{key}: max |delta| {worst:.3g} against the plain optimizer"
    print(key, f"max |delta| {worst:.3g}")
    for n in want:
        assert torch.equal(res[0][n], res[1][n]), f"{key}: ranks differ in {n}"


@pytest.mark.parametrize("how", list(HOW))
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_variants_match_torch(variant: str, how: str) -> None:
    # the reference runs the same forward: checkpointing / autocast must not change the numbers
    _check((variant, how), _reference(functools.partial(_model, how), _loss), _model(how)[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_gradient_checkpointing_matches_torch(variant: str) -> None:
    pytest.importorskip("transformers")
    _check((variant, "hf"), _reference(_hf_model, _hf_loss), _hf_model()[0])
