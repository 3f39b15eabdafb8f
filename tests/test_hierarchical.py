"""Hierarchical ZeRO (issue 21): 4 gloo ranks as 2 shard groups x 2 replicas
(shard groups {0,1}, {2,3}; replicate groups {0,2}, {1,3}).

One 4-rank job runs every scenario (spawning ranks is the expensive part);
the tests compare its results with plain single-process torch on the global
batch, with flat zerocomm on the same 4 ranks, and across the ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from dist_utils import run_ranks, tiny_mlp

WORLD, L = 4, 2  # 2 shard groups of L ranks, M = WORLD // L replicas of each shard
STEPS, SHORT = 50, 12  # the done-when's 50 steps; the feature scenarios run SHORT
MICRO = 2  # no_sync accumulation: micro-batches per step
MAX_NORM = 0.05  # small enough that clipping is active
BUCKET_MB = 0.0005  # a few hundred bytes: several buckets per plan
TOL = 1e-5  # the rule: max |delta| < 1e-5 in fp32


def _opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)


def _loss(model: nn.Module, step: int, rank: int, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * micro + 100 * step + rank)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(4, 8, generator=g).to(dtype), torch.randn(4, 4, generator=g).to(dtype)
    return ((model(x) - y) ** 2).mean()


def _is_expert(name: str, p: nn.Parameter) -> bool:
    return name.startswith("4.")  # the last Linear of tiny_mlp


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------- ranks

# scenario -> (steps, attach options, loop case); "layout" picks the groups
SCENARIOS: dict[str, tuple[int, dict[str, Any], str]] = {
    "ag": (STEPS, dict(mode="allgather", layout="groups"), "plain"),
    "bc": (STEPS, dict(mode="broadcast", layout="groups"), "plain"),
    "flat_ag": (STEPS, dict(mode="allgather", layout="flat"), "plain"),
    "flat_bc": (STEPS, dict(mode="broadcast", layout="flat"), "plain"),
    "mesh_ag": (SHORT, dict(mode="allgather", layout="mesh"), "plain"),
    "zero2": (SHORT, dict(mode="allgather", layout="groups", shard_grads=True), "plain"),
    "accum_bc": (SHORT, dict(mode="broadcast", layout="groups"), "accum"),
    "clip_ag": (SHORT, dict(mode="allgather", layout="groups"), "clip"),
    "clip_bc": (SHORT, dict(mode="broadcast", layout="groups"), "clip"),
    "ddp_bc": (SHORT, dict(mode="broadcast", layout="groups"), "ddp"),
    "chunks_ag": (SHORT, dict(mode="allgather", layout="groups"), "chunks"),
    "master64": (SHORT, dict(mode="allgather", layout="groups", master_dtype=torch.float64), "plain"),
    "master64_bc": (SHORT, dict(mode="broadcast", layout="groups", master_dtype=torch.float64), "plain"),
    "bf16": (SHORT, dict(mode="allgather", layout="groups", master_dtype=torch.float32), "bf16"),
    "bf16_flat": (SHORT, dict(mode="allgather", layout="flat", master_dtype=torch.float32), "bf16"),
    "experts": (SHORT, dict(mode="allgather", layout="groups", expert_filter=_is_expert), "plain"),
    "experts_world": (
        SHORT,
        dict(mode="broadcast", layout="groups", expert_filter=_is_expert, expert_group="world"),
        "plain",
    ),
}


def _grid(rank: int) -> dict[str, Any]:
    """Every group of the test, made on every rank (new_group is collective)."""
    shard = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rep = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    single = [dist.new_group([r]) for r in range(WORLD)]
    return dict(shard=shard[rank // L], replicate=rep[rank % L], all_shard=shard, all_rep=rep, single=single)


def _layout_kwargs(which: str, grid: dict[str, Any]) -> dict[str, Any]:
    if which == "flat":
        return {}
    if which == "mesh":
        from torch.distributed.device_mesh import init_device_mesh

        return dict(mesh=init_device_mesh("cpu", (WORLD // L, L), mesh_dim_names=("replicate", "shard")))
    return dict(shard_group=grid["shard"], replicate_group=grid["replicate"])


def _scenario(rank: int, grid: dict[str, Any], name: str) -> dict[str, Any]:
    import zerocomm

    steps, options, case = SCENARIOS[name]
    options = dict(options)
    layout = _layout_kwargs(options.pop("layout"), grid)
    if options.get("expert_group") == "world":
        options["expert_group"] = dist.group.WORLD
    model = tiny_mlp()
    if case == "bf16":
        model = model.to(torch.bfloat16)
    opt = _opt(model)
    run: Callable[..., torch.Tensor] = model
    if case == "chunks":  # pipeline chunks: attach a list of modules, run them in turn
        chunks = [model[:2], model[2:]]
        zopt = zerocomm.attach(chunks, opt, bucket_mb=BUCKET_MB, **layout, **options)
        run = nn.Sequential(*chunks)
    else:
        zopt = zerocomm.attach(model, opt, bucket_mb=BUCKET_MB, **layout, **options)
    if case == "ddp":
        run = nn.parallel.DistributedDataParallel(model)
    norms = []
    for step in range(steps):
        if case == "accum":
            for micro in range(MICRO):
                quiet = zopt.no_sync() if micro < MICRO - 1 else contextlib.nullcontext()
                with quiet:
                    (_loss(run, step, rank, micro) / MICRO).backward()
        else:
            _loss(run, step, rank).backward()
        if case == "clip":
            norms.append(float(zopt.clip_grad_norm_(MAX_NORM)))
        zopt.step()
        zopt.zero_grad()
    zopt.synchronize()
    out = dict(params=_params(model), traffic=zopt.traffic(), norms=norms)
    layouts = zopt.layouts
    out["layout"] = {k: (v.shard_size, v.replica_size, v.shard_rank, v.replica_rank) for k, v in layouts.items()}
    zopt.close()
    return out


def _simulated_traffic() -> dict[str, dict[str, int]]:
    """The simulated transport's two-tier mode (replicas > 1): the replica
    stage runs on the modelled inter-node communicator."""
    import zerocomm
    from zerocomm.transport import SimulatedTransport

    model = tiny_mlp()
    sim = SimulatedTransport(latency_us=0.0, bandwidth_gbps=1000.0, modelled_world=L, replicas=WORLD // L)
    zopt = zerocomm.attach(model, _opt(model), mode="allgather", transport=sim, bucket_mb=BUCKET_MB)
    for step in range(2):
        _loss(model, step, 0).backward()
        zopt.step()
        zopt.zero_grad()
    zopt.synchronize()  # the counts are taken as the collectives run
    out = zopt.traffic()
    zopt.close()
    return out


def _bad_layouts(rank: int, grid: dict[str, Any]) -> dict[str, str]:
    """Each bad layout's error on this rank ('no error' if attach passed)."""
    import zerocomm

    shard, rep = grid["shard"], grid["replicate"]
    # new_group is collective: every rank makes both, in the same order
    mixed = {0: dist.new_group([0, 3]), 1: dist.new_group([1, 2])}
    cases: dict[str, dict[str, Any]] = {
        # rank 0 alone names its own shard group as its replicate group too
        "overlap": dict(shard_group=shard, replicate_group=shard if rank == 0 else rep),
        # every rank: 2 x 1 ranks for a world of 4
        "cover": dict(shard_group=shard, replicate_group=grid["single"][rank]),
        # rank 3 alone passes the transposed grid ({1,3} x {2,3}): locally fine
        "differ": dict(
            shard_group=grid["all_rep"][1] if rank == 3 else shard,
            replicate_group=grid["all_shard"][1] if rank == 3 else rep,
        ),
        # replicate groups that mix shard positions: {0,1} x {0,3}, {2,3} x {1,2}
        "positions": dict(shard_group=shard, replicate_group=mixed[0] if rank in (0, 3) else mixed[1]),
        "both": dict(group=dist.group.WORLD, shard_group=shard, replicate_group=rep),
    }
    out = {}
    model = tiny_mlp()
    for name, kwargs in cases.items():
        try:
            zerocomm.attach(model, _opt(model), mode="allgather", **kwargs).close()
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _to_rank(rank: int, grid: dict[str, Any]) -> dict[str, Any]:
    """state_dict(to_rank=): a rank of the whole data-parallel group (2 x 2)."""
    import zerocomm

    model = tiny_mlp()
    zopt = zerocomm.attach(model, _opt(model), mode="allgather", bucket_mb=BUCKET_MB, **_layout_kwargs("grid", grid))
    _loss(model, 0, rank).backward()
    zopt.step()
    zopt.zero_grad()
    full = zopt.state_dict()
    got = zopt.state_dict(to_rank=3)
    try:
        zopt.state_dict(to_rank=WORLD)
        error = "no error"
    except ValueError as e:
        error = str(e)
    zopt.close()
    same = bool(got) and all(
        torch.equal(a, b) for i in full["state"] for a, b in zip(full["state"][i].values(), got["state"][i].values())
    )
    return dict(got=bool(got), same=same, error=error)


def _job(rank: int, world: int, names: tuple[str, ...]) -> dict[str, Any]:
    torch.set_num_threads(1)
    grid = _grid(rank)
    out: dict[str, Any] = {name: _scenario(rank, grid, name) for name in names}
    out["to_rank"] = _to_rank(rank, grid)
    out["errors"] = _bad_layouts(rank, grid)
    out["simulated"] = _simulated_traffic()
    return out


_RESULT: list[Any] = []


def _results() -> list[dict[str, Any]]:
    """The 4-rank job runs once per session; a failure is re-raised by
    every test that needs it."""
    if not _RESULT:
        try:
            _RESULT.append(run_ranks(_job, WORLD, tuple(SCENARIOS), timeout=240.0))
        except Exception as e:  # noqa: BLE001 - cached and re-raised below
            _RESULT.append(e)
    res = _RESULT[0]
    if isinstance(res, Exception):
        raise res
    return res


# ----------------------------------------------------------------- reference


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_REFS: dict[tuple[str, int], Any] = {}


def _reference(case: str, steps: int) -> dict[str, Any]:
    """Plain torch on one process: the mean loss over the 4 ranks' batches
    (the average of their gradients), the unsharded AdamW."""
    key = (case, steps)
    if key not in _REFS:
        with _one_thread():
            model = tiny_mlp()
            opt = _opt(model)
            norms = []
            for step in range(steps):
                micros = MICRO if case == "accum" else 1
                for micro in range(micros):
                    loss = sum(_loss(model, step, r, micro) for r in range(WORLD)) / WORLD
                    (loss / micros).backward()
                if case == "clip":
                    norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
                opt.step()
                opt.zero_grad()
            _REFS[key] = dict(params=_params(model), norms=norms, init=_params(tiny_mlp()))
    return _REFS[key]


def _max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["ag", "bc"])
def test_matches_torch_and_flat_zerocomm(mode: str) -> None:
    """Done when 1: 50 AdamW steps equal single-process torch and flat
    zerocomm; every rank bitwise equal (replicas and shard-group peers)."""
    res = _results()
    ref = _reference("plain", STEPS)
    moved = _max_delta(ref["params"], ref["init"])
    assert moved > 1e-2, "the reference barely trained: the comparison would be vacuous"
    for rank in range(WORLD):
        got = res[rank][mode]
        assert got["layout"]["dense"] == (L, WORLD // L, rank % L, rank // L)
        delta = _max_delta(got["params"], ref["params"])
        assert delta < TOL, f"{mode} rank {rank}: max |delta| vs torch {delta:.3g}"
        flat = _max_delta(got["params"], res[rank][f"flat_{mode}"]["params"])
        assert flat < TOL, f"{mode} rank {rank}: max |delta| vs flat zerocomm {flat:.3g}"
        for n, t in got["params"].items():
            assert torch.equal(t, res[0][mode]["params"][n]), f"{mode}: rank {rank} differs from rank 0 in {n}"


@pytest.mark.parametrize(
    "name, case",
    [
        ("mesh_ag", "plain"),
        ("zero2", "plain"),
        ("accum_bc", "accum"),
        ("clip_ag", "clip"),
        ("clip_bc", "clip"),
        ("ddp_bc", "plain"),
        ("chunks_ag", "plain"),
        ("master64", "plain"),
        ("master64_bc", "plain"),
        ("experts", "plain"),
        ("experts_world", "plain"),
    ],
)
def test_features_match_torch(name: str, case: str) -> None:
    """mesh=, ZeRO-2, no_sync accumulation, clip_grad_norm_ (the true global
    norm), a DDP-wrapped model, masters, expert parameters: exact and
    bitwise equal on every rank."""
    res = _results()
    ref = _reference(case, SHORT)
    for rank in range(WORLD):
        got = res[rank][name]
        delta = _max_delta(got["params"], ref["params"])
        assert delta < TOL, f"{name} rank {rank}: max |delta| vs torch {delta:.3g}"
        for n, t in got["params"].items():
            assert torch.equal(t, res[0][name]["params"][n]), f"{name}: rank {rank} differs from rank 0 in {n}"
        if case == "clip":
            assert max(ref["norms"]) > MAX_NORM, "clipping never engaged"
            for got_n, want_n in zip(got["norms"], ref["norms"], strict=True):
                assert abs(got_n - want_n) < TOL * max(1.0, want_n), (name, rank, got_n, want_n)
    if name == "experts_world":  # the expert plan shards flat over its expert_group
        assert res[0][name]["layout"]["expert"] == (WORLD, 1, 0, 0)
    if name == "experts":  # without expert_group it shares the dense layout
        assert res[0][name]["layout"]["expert"] == (L, WORLD // L, 0, 0)


def test_bf16_masters_match_flat() -> None:
    """bf16 working parameters with fp32 masters: the hierarchical run stays
    with the flat one (bf16 sums in another order: bf16-sized differences)
    and its ranks are bitwise equal."""
    res = _results()
    for rank in range(WORLD):
        got = res[rank]["bf16"]["params"]
        assert _max_delta(got, res[rank]["bf16_flat"]["params"]) < 2e-2
        for n, t in got.items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, res[0]["bf16"]["params"][n]), f"bf16: rank {rank} differs in {n}"


@pytest.mark.parametrize("mode", ["ag", "bc"])
def test_bytes_across_replicas(mode: str) -> None:
    """Done when 2, measured on the same run (the scheduler counts what it
    hands to each communicator): no parameter bytes cross replica groups,
    and the gradient bytes that do are at most 1/L of the flat layout's
    total traffic."""
    res = _results()
    hier = [res[r][mode]["traffic"] for r in range(WORLD)]
    flat = [res[r][f"flat_{mode}"]["traffic"] for r in range(WORLD)]
    param_ops = ("broadcast", "all_gather")
    for r, t in enumerate(hier):
        assert set(t["replica"]) == {"all_reduce"}, f"rank {r}: replica tier ran {sorted(t['replica'])}"
        assert sum(t["replica"].get(op, 0) for op in param_ops) == 0
        assert sum(t["shard"].get(op, 0) for op in param_ops) > 0, "the parameter sync ran in the shard group"
        assert flat[r]["replica"] == {}, "a flat layout has no replica tier"
    across = sum(t["replica"]["all_reduce"] for t in hier)
    flat_total = sum(n for t in flat for tier in t.values() for n in tier.values())
    assert across > 0
    assert across <= flat_total / L, f"{across} bytes crossed replicas; flat total {flat_total}, L={L}"


def test_simulated_two_tier_runs_the_replica_stage() -> None:
    res = _results()
    for rank in range(WORLD):
        t = res[rank]["simulated"]
        assert t["replica"].get("all_reduce", 0) > 0, t
        # a world-size-1 shard group: the whole bucket is the shard, and crosses the replicas
        assert t["shard"]["reduce_scatter"] == t["replica"]["all_reduce"] == t["shard"]["all_gather"], t


@pytest.mark.parametrize(
    "case, words",
    [
        ("overlap", "overlap"),
        ("cover", "does not cover the world"),
        ("differ", "rank 3"),
        ("positions", "same index in their shard groups"),
        ("both", "not both"),
    ],
)
def test_bad_layout_raises_on_every_rank(case: str, words: str) -> None:
    res = _results()
    for rank in range(WORLD):
        msg = res[rank]["errors"][case]
        assert msg != "no error", f"{case}: rank {rank} attached"
        assert words in msg, f"{case}: rank {rank}: {msg}"


def test_state_dict_to_rank_counts_in_the_whole_data_parallel_group() -> None:
    """to_rank=3 in a 2 x 2 layout: global rank 3 alone gets the full
    state_dict (counted in the shard group, nobody or the wrong ranks would);
    a rank outside the group raises on every rank."""
    res = [r["to_rank"] for r in _results()]
    assert [r["got"] for r in res] == [False, False, False, True], res
    assert res[3]["same"], "the state_dict sent to rank 3 differs from the all-ranks one"
    for r in res:
        assert "to_rank=4" in r["error"] and "data-parallel group" in r["error"], r["error"]
