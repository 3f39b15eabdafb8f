"""Validation at zerocomm.attach: bad input raises a clear error naming the
problem, and ranks that disagree (different models, or a check failing on
one rank only) all raise instead of hanging.

Single-rank checks share one spawned world-size-1 job: starting a rank costs
seconds. Each check is a module-level function so a failure names it.
"""

from __future__ import annotations

import math
import re
import time
from datetime import timedelta
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch import nn

# --------------------------------------------------------------------- helpers


class Net(nn.Module):
    """Two blocks (a ModuleList of two Linears) plus a head."""

    def __init__(self, hidden: int = 6, extra: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, hidden), nn.Linear(hidden, 4)])
        if extra:
            self.layers.append(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class PerTensorNorm(torch.optim.SGD):
    """Stands in for a non-element-wise optimizer (Muon, LAMB): its name is
    not on zerocomm's element-wise list."""


def _attach(model: nn.Module, opt: torch.optim.Optimizer | None = None, **kw: object):
    import zerocomm

    kw.setdefault("mode", "broadcast")
    return zerocomm.attach(model, opt, **kw)


def _raises(exc: type[Exception], match: str, fn: Callable[[], object]) -> None:
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------- single-rank checks
# Each returns nothing and raises on failure; `_job_single` runs them all.


def check_unknown_mode() -> None:
    _raises(
        ValueError,
        r"unknown mode 'scatter': expected one of 'broadcast', 'allgather'",
        lambda: _attach(Net(), mode="scatter"),
    )


def check_unknown_partition() -> None:
    _raises(ValueError, r"unknown partition 'random'", lambda: _attach(Net(), partition="random"))


def check_bucket_mb_range() -> None:
    for bad in (0, -1.0, 5000, math.nan):
        _raises(ValueError, r"bucket_mb must be in \(0, 4096\] MiB", lambda: _attach(Net(), bucket_mb=bad))
    _raises(TypeError, r"bucket_mb must be a number of MiB, got str", lambda: _attach(Net(), bucket_mb="25"))


def check_align_bytes() -> None:
    _raises(ValueError, r"align_bytes must be a power of two >= 1, got 12", lambda: _attach(Net(), align_bytes=12))


def check_timeout() -> None:
    for bad in (0, -5.0):
        _raises(ValueError, r"timeout must be a positive number of seconds", lambda: _attach(Net(), timeout=bad))


def check_unknown_transport() -> None:
    _raises(ValueError, r"unknown transport 'mpi'", lambda: _attach(Net(), transport="mpi"))


def check_expert_filter_not_callable() -> None:
    _raises(TypeError, r"expert_filter must be a callable", lambda: _attach(Net(), expert_filter="experts"))


def check_model_not_a_module() -> None:
    _raises(TypeError, r"model must be an nn.Module or a list of them, got dict", lambda: _attach({"w": 1}))


def check_mixed_devices() -> None:
    model = Net()
    model.head = nn.Linear(4, 2, device="meta")  # meta: a second device without a GPU
    _raises(
        ValueError,
        r"parameters on mixed devices: layers.0.weight is on cpu but head.weight is on meta",
        lambda: _attach(model),
    )


def check_unsupported_dtype() -> None:
    model = Net()
    model.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    _raises(
        ValueError,
        r"parameter phase has dtype torch.complex64; zerocomm syncs floating parameters only",
        lambda: _attach(model),
    )


def check_non_contiguous() -> None:
    model = Net()
    model.head.weight = nn.Parameter(torch.randn(2, 4).t().contiguous().t())  # transposed view
    _raises(ValueError, r"parameter head.weight is not contiguous", lambda: _attach(model))


def check_no_trainable_parameters() -> None:
    msg = r"the model has no trainable parameters \(all are frozen or it has none\)"
    frozen = Net().requires_grad_(False)
    _raises(ValueError, msg, lambda: _attach(frozen))
    _raises(ValueError, msg, lambda: _attach(nn.ReLU()))


def check_optimizer_foreign_param() -> None:
    model = Net()
    stranger = nn.Parameter(torch.zeros(7, 3))
    opt = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    _raises(
        ValueError,
        r"optimizer param_groups\[0\]\['params'\]\[6\] \(shape \(7, 3\)\) is not a parameter of the model",
        lambda: _attach(model, opt),
    )


def check_optimizer_missing_param() -> None:
    model = Net()
    opt = torch.optim.SGD(model.layers.parameters(), lr=0.1)  # head left out
    _raises(
        ValueError,
        r"2 trainable parameter\(s\) are not in the optimizer, e.g. head.weight",
        lambda: _attach(model, opt),
    )


def check_optimizer_type() -> None:
    _raises(TypeError, r"optimizer must be a torch.optim.Optimizer, got list", lambda: _attach(Net(), [torch.zeros(1)]))


def check_optimizer_options() -> None:
    model = Net()
    _raises(
        TypeError,
        r"unexpected options without an optimizer: \['master_dtype'\]",
        lambda: _attach(model, master_dtype=torch.float32),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _raises(TypeError, r"unexpected attach options \['momentum'\]", lambda: _attach(model, opt, momentum=0.9))
    _raises(
        TypeError,
        r"master_dtype must be a floating dtype, got torch.int32",
        lambda: _attach(model, opt, master_dtype=torch.int32),
    )


def check_non_elementwise_in_allgather() -> None:
    model = Net()
    opt = PerTensorNorm(model.parameters(), lr=0.1)
    _raises(
        ValueError,
        r"PerTensorNorm is not an element-wise optimizer.*use mode='broadcast'",
        lambda: _attach(model, opt, mode="allgather"),
    )
    _attach(model, opt, mode="broadcast").close()  # the same optimizer is fine there
    _attach(model, opt, mode="allgather", elementwise=True).close()  # explicit override


def check_sparse_module() -> None:
    model = Net()
    model.emb = nn.Embedding(10, 4, sparse=True)
    _raises(ValueError, r"module emb produces sparse gradients \(sparse=True\)", lambda: _attach(model))


def check_sparse_grad() -> None:
    model = Net()
    model.head.bias.grad = torch.zeros(2).to_sparse()
    _raises(ValueError, r"parameter head.bias has a sparse gradient", lambda: _attach(model))


def check_second_attach() -> None:
    model = Net()
    first = _attach(model)
    _raises(
        ValueError,
        r"this model already has a zerocomm handle attached: call close\(\) on it first",
        lambda: _attach(model, mode="allgather"),
    )
    # the same check through a list of chunks holding the model
    _raises(ValueError, r"already has a zerocomm handle attached", lambda: _attach([model]))
    first.close()
    _attach(model, mode="allgather").close()  # allowed once the first is closed


def check_failed_attach_leaves_no_trace() -> None:
    """A refused attach installs nothing: the model trains on without hooks
    and can be attached properly afterwards."""
    model = Net()
    with pytest.raises(ValueError):
        _attach(model, bucket_mb=0)
    assert getattr(model, "_zerocomm_handle", None) is None
    assert all(not m._forward_pre_hooks for m in model.modules())
    _attach(model).close()


def check_default_timeout_is_the_groups() -> None:
    """Every zerocomm wait uses `timeout=`, else the process group's own."""
    group = dist.new_group(ranks=[0], timeout=timedelta(seconds=17))
    h = _attach(Net(), group=group)
    assert [u.transport.timeout_s for u in h.units] == [17.0]
    h.close()
    h = _attach(Net(), group=group, timeout=3)
    assert [u.transport.timeout_s for u in h.units] == [3.0]
    h.close()


CHECKS = [
    check_unknown_mode,
    check_unknown_partition,
    check_bucket_mb_range,
    check_align_bytes,
    check_timeout,
    check_unknown_transport,
    check_expert_filter_not_callable,
    check_model_not_a_module,
    check_mixed_devices,
    check_unsupported_dtype,
    check_non_contiguous,
    check_no_trainable_parameters,
    check_optimizer_foreign_param,
    check_optimizer_missing_param,
    check_optimizer_type,
    check_optimizer_options,
    check_non_elementwise_in_allgather,
    check_sparse_module,
    check_sparse_grad,
    check_second_attach,
    check_failed_attach_leaves_no_trace,
    check_default_timeout_is_the_groups,
]


def _job_single(rank: int, world: int) -> dict[str, str]:
    """Runs every check; returns {name: 'ok' or the failure} so one broken
    check does not hide the others."""
    out = {}
    for check in CHECKS:
        try:
            check()
            out[check.__name__] = "ok"
        except BaseException as e:  # reported per check by the test
            out[check.__name__] = f"{type(e).__name__}: {e}"
    return out


@pytest.fixture(scope="module")
def single_rank_results() -> dict[str, str]:
    return run_ranks(_job_single, 1, timeout=120)[0]


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_validation_error(single_rank_results: dict[str, str], check: str) -> None:
    assert single_rank_results[check] == "ok", single_rank_results[check]


def test_not_initialised() -> None:
    import zerocomm

    assert not dist.is_initialized()
    with pytest.raises(
        ValueError,
        match=r"torch.distributed is not initialised: call "
        r"torch.distributed.init_process_group",
    ):
        zerocomm.attach(Net(), mode="broadcast")


# ------------------------------------------------------------ cross-rank checks


def _job_mismatch(rank: int, world: int, kind: str) -> float:
    """Ranks attach different things; returns seconds until attach raised
    (reaching the return means it did not)."""
    import zerocomm

    model = Net()
    kw: dict = dict(mode="broadcast")
    if kind == "hidden" and rank == 1:
        model = Net(hidden=7)
    elif kind == "extra_layer" and rank == world - 1:
        model = Net(extra=True)
    elif kind == "bucket_mb" and rank == 2:
        kw["bucket_mb"] = 1.0
    elif kind == "local_error" and rank == 1:
        kw["mode"] = "bogus"  # fails rank 1's own checks only
    dist.barrier()
    t0 = time.monotonic()
    try:
        zerocomm.attach(model, **kw)
    except ValueError as e:
        elapsed = time.monotonic() - t0
        raise ValueError(f"[after {elapsed:.1f} s] {e}") from None
    return time.monotonic() - t0


# (kind, world, expected message on every rank, or per-rank messages)
MISMATCHES = {
    "hidden": (
        3,
        r"ranks disagree on the model/plan at entry 2 \(after block 'layers.0'\): "
        r"ranks 0,2 have param 'layers.0.weight \(6, 4\) torch.float32'; "
        r"rank 1 has param 'layers.0.weight \(7, 4\) torch.float32'",
    ),
    "extra_layer": (
        2,
        r"ranks disagree on the model/plan at entry 7 \(after block 'layers.1'\): "
        r"rank 0 has block 'head'; rank 1 has block 'layers.2'",
    ),
    "bucket_mb": (
        3,
        r"ranks disagree on the model/plan at entry 0: "
        r"ranks 0,1 have config 'mode=broadcast partition=balanced bucket_mb=25.0 .*'; "
        r"rank 2 has config 'mode=broadcast partition=balanced bucket_mb=1.0 ",
    ),
}


@pytest.mark.parametrize("kind", sorted(MISMATCHES))
def test_mismatched_ranks_all_raise(kind: str) -> None:
    world, pattern = MISMATCHES[kind]
    # 30 s for attach to raise, plus process start-up on a loaded 2-core machine
    results = run_ranks(_job_mismatch, world, kind, timeout=30 + 45, expect_errors=True)
    for rank, res in enumerate(results):
        assert res.get("type") == "ValueError", f"rank {rank} did not raise: {res}"
        elapsed = float(res["error"].split("[after ")[1].split(" s]")[0])
        assert elapsed < 30, f"rank {rank} took {elapsed} s to raise"
        assert re.search(pattern, res["error"]), f"rank {rank}: {res['error']}"
        assert "every rank must build the same model" in res["error"]


def test_check_failing_on_one_rank_fails_all() -> None:
    results = run_ranks(_job_mismatch, 2, "local_error", timeout=30 + 45, expect_errors=True)
    assert results[1].get("type") == "ValueError", results[1]
    assert "unknown mode 'bogus'" in results[1]["error"]
    # rank 0's own input was fine: it hears of rank 1's error instead of hanging
    assert results[0].get("type") == "ValueError", results[0]
    assert (
        "zerocomm.attach failed on another rank, so no rank proceeds (rank 1: ValueError: unknown mode 'bogus'"
    ) in results[0]["error"]


def test_describe_mismatch_unit() -> None:
    """The message logic on hand-made fingerprints (no processes)."""
    from zerocomm.validate import describe_mismatch

    a = [("config", "c"), ("block", "b0"), ("param", "w (2,)")]
    assert describe_mismatch([a, list(a), list(a)], [0, 1, 2]) is None
    short = a[:2]
    msg = describe_mismatch([a, short, a], [4, 5, 6])  # global ranks of a subgroup
    assert msg is not None
    assert "at entry 2 (after block 'b0'): ranks 4,6 have param 'w (2,)'; rank 5 has end '<no more entries>'" in msg


def test_optimizer_options_are_the_constructor_keywords() -> None:
    """attach() refuses options by ZeroOptimizer.OPTIONS: it must list exactly what the class takes."""
    import inspect

    from zerocomm.optimizer import ZeroOptimizer

    kw = {
        n
        for n, p in inspect.signature(ZeroOptimizer.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert ZeroOptimizer.OPTIONS == kw
