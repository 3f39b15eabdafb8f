"""The smoke subset (issue 19): the few checks CI runs on every supported
torch besides the pinned one (`make smoke`, .ci/run on torch 2.11.0): the
fused flatten, a 2-rank attach + step in both modes against plain AdamW on
one process, and a checkpoint round trip. About 30 s on 2 cores; the full
suite covers each in depth (test_flatten.py, test_optimizer.py,
test_checkpoint.py)."""

from __future__ import annotations

import os

import torch
from dist_utils import run_ranks
from torch import nn

MODES = ("broadcast", "allgather")
VOCAB, SEQ, BATCH, LR = 64, 16, 8, 1e-2
STEPS, SAVE_AT = 4, 2


def _model(seed: int = 0) -> nn.Module:
    from zerocomm.testing.models import TinyGPT

    return TinyGPT(vocab=VOCAB, dim=32, n_layers=2, n_heads=4, seq=SEQ, qkv_bias=False, seed=seed)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for s in steps:
        x, y = _batch(s)
        model.loss(x[rows], y[rows]).backward()
        opt.step()
        opt.zero_grad()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _job(rank: int, world: int, root: str) -> dict:
    """Per mode: train SAVE_AT steps and save; then a differently seeded
    model in the other mode loads the checkpoint and trains on to STEPS."""
    import zerocomm
    from zerocomm import checkpoint

    out: dict = {}
    for mode in MODES:
        model = _model()
        zopt = zerocomm.attach(model, torch.optim.AdamW(model.parameters(), lr=LR), mode=mode, bucket_mb=0.01)
        _train(model, zopt, range(SAVE_AT), rank, world)
        checkpoint.save(os.path.join(root, mode), zopt, step=SAVE_AT)
        _train(model, zopt, range(SAVE_AT, STEPS), rank, world)
        zopt.synchronize()
        out[mode] = _params(model)
        zopt.close()
    for src, mode in zip(MODES, reversed(MODES)):
        model = _model(seed=1)
        zopt = zerocomm.attach(model, torch.optim.AdamW(model.parameters(), lr=LR), mode=mode, bucket_mb=0.01)
        step, _ = checkpoint.load(os.path.join(root, src), zopt)
        assert step == SAVE_AT
        _train(model, zopt, range(SAVE_AT, STEPS), rank, world)
        zopt.synchronize()
        out[f"{src}->{mode}"] = _params(model)
        zopt.close()
    return out


def _reference() -> dict[str, torch.Tensor]:
    model = _model()
    _train(model, torch.optim.AdamW(model.parameters(), lr=LR), range(STEPS))
    return _params(model)


def test_flatten_roundtrip() -> None:
    import zerocomm

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) for n in (1, 7, 1000, 4096, 33)]
    layout = zerocomm.FlatLayout(ts, align_bytes=16)
    flat = zerocomm.flatten(ts, layout=layout)
    for t, off in zip(ts, layout.offsets):
        assert torch.equal(flat[off : off + t.numel()], t)
    back = [torch.zeros_like(t) for t in ts]
    zerocomm.unflatten(flat, back, layout=layout)
    assert all(torch.equal(a, b) for a, b in zip(back, ts))


def test_two_ranks_both_modes_and_checkpoint_round_trip(tmp_path) -> None:
    res = run_ranks(_job, 2, str(tmp_path), timeout=240)
    ref = _reference()
    moved = max(float((ref[n] - p).abs().max()) for n, p in _params(_model()).items())
    assert moved > 1e-3, "the reference barely trained: the comparison would be vacuous"
    for key in res[0]:
        for n, want in ref.items():
            # rank 0 and rank 1 hold the very same parameters
            assert torch.equal(res[0][key][n], res[1][key][n]), f"{key}: ranks differ on {n}"
            torch.testing.assert_close(res[0][key][n], want, rtol=0, atol=3e-5, msg=lambda m: f"{key} {n}: {m}")
