"""The two-tier network (issue 21): benchmarks/scale_model.py's arithmetic for a
cluster of nodes, and the simulated transport charging what it models. No
timing is asserted: the simulated communicators report the modelled seconds
they charged (simulated_charges), which must equal the scale model's costs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale_model as sm  # noqa: E402

US, GB = 1e-6, 1e9
# 4 nodes x 8 GPUs; tiers: 2 us / 360 GB/s within a node, 10 us / 40 GB/s across
CLUSTER = sm.Cluster(8, 4, 2 * US, 360 * GB, 10 * US, 40 * GB)


def test_ring_latency_and_tier_follow_the_nodes_a_group_spans() -> None:
    c = CLUSTER
    links = sm.layout_links(c, 8, "ring")  # a node per shard group, 4 replicas on 4 nodes
    assert links["M"] == 4
    assert links["shard"] == pytest.approx((7 * c.alpha_intra_s, c.beta_intra_Bps, "intra"))
    assert links["replica"] == pytest.approx((3 * c.alpha_inter_s, c.beta_inter_Bps, "inter"))
    flat = sm.layout_links(c, 32, "ring")  # 32 ranks on 4 nodes: 3 node boundaries, 28 NVLink hops
    assert flat["shard"] == pytest.approx((3 * c.alpha_inter_s + 28 * c.alpha_intra_s, c.beta_inter_Bps, "inter"))
    assert flat["M"] == 1 and flat["replica"][2] == "-"
    two = sm.layout_links(c, 2, "ring")  # 16 replicas, 4 on each node
    assert two["replica"] == pytest.approx((3 * c.alpha_inter_s + 12 * c.alpha_intra_s, c.beta_inter_Bps, "inter"))
    spanning = sm.layout_links(c, 16, "ring")  # a shard group over 2 nodes, 2 replicas
    assert spanning["shard"] == pytest.approx((1 * c.alpha_inter_s + 14 * c.alpha_intra_s, c.beta_inter_Bps, "inter"))
    log = sm.layout_links(c, 32, "log")
    assert log["shard"][0] == pytest.approx(2 * c.alpha_inter_s + 3 * c.alpha_intra_s)
    one_node = sm.Cluster(8, 1, 2 * US, 360 * GB, 10 * US, 40 * GB)
    assert sm.layout_links(one_node, 2, "ring")["replica"][2] == "intra"
    assert sm.shard_group_sizes(c) == [1, 2, 4, 8, 16, 32]


def test_layout_costs_split_the_gradient_between_the_tiers() -> None:
    c, nb = CLUSTER, 64e6
    ag, rs, ar = sm.layout_costs([nb], [nb], c, 8, "ring")
    assert ag[0] == pytest.approx(7 * c.alpha_intra_s + 7 / 8 * nb / c.beta_intra_Bps)
    assert rs[0] == pytest.approx(7 * c.alpha_intra_s + 7 / 8 * nb / c.beta_intra_Bps)
    # the 1/8 shard, all-reduced over 4 replicas: 2 passes, 2 * 3/4 of the shard
    assert ar[0] == pytest.approx(2 * 3 * c.alpha_inter_s + 2 * 3 / 4 * (nb / 8) / c.beta_inter_Bps)
    ag, rs, ar = sm.layout_costs([nb], [nb], c, 32, "ring")  # flat: no replica stage
    assert ar == [0.0]
    assert ag[0] == pytest.approx(3 * c.alpha_inter_s + 28 * c.alpha_intra_s + 31 / 32 * nb / c.beta_inter_Bps)


def test_hierarchical_beats_flat_and_the_recommendation_respects_memory() -> None:
    args = sm.parse_args(["--hier-only"])
    prof = sm.two_tier_profile(args)
    t = sm.two_tier_table("7B", sm.two_tier_cluster(args, 8, 16), prof)
    by_l = {r["L"]: r for r in t["layouts"]}
    assert sorted(by_l) == [1, 2, 4, 8, 16, 32, 64, 128] and t["flat"]["L"] == 128
    node, flat = by_l[8], by_l[128]
    assert node["exposed_s"] < flat["exposed_s"] and node["sync_s"] < flat["sync_s"]
    # only the 1/L gradient shards cross nodes: 2 (M-1)/M of them, M = 16
    P = flat["wire_bytes_per_gpu"]["param"] / (127 / 128) / args.param_bytes
    assert node["inter_node_bytes_per_gpu"] == pytest.approx(2 * 15 / 16 * P * args.grad_bytes / 8, rel=1e-3)
    # model state: params + grads + 12 B/param over L; L=1, 2 exceed the 60 GB budget
    assert node["model_state_gb_per_gpu"] == pytest.approx(P * (4 + 12 / 8) / 1e9, rel=1e-3)
    assert [r["fits"] for r in t["layouts"]][:3] == [False, False, True]
    assert t["recommended"] == {"L": 8, "fits": True, "any_fits": True}
    # a budget only the flat layout meets moves the recommendation there
    tight = dict(prof, state_budget_gb=flat["model_state_gb_per_gpu"] + 0.01)
    assert sm.two_tier_table("7B", sm.two_tier_cluster(args, 8, 16), tight)["recommended"]["L"] == 128


def test_recommend_prefers_the_larger_group_on_a_tie() -> None:
    rows = [
        {"L": 4, "exposed_s": 1.000, "fits": True},
        {"L": 8, "exposed_s": 1.005, "fits": True},
        {"L": 16, "exposed_s": 0.9, "fits": False},
    ]
    assert sm.recommend(rows) == {"L": 8, "fits": True, "any_fits": True}
    assert sm.recommend([dict(r, fits=False) for r in rows])["L"] == 16


def _charged(comm: object, op: str, numel: int) -> dict:
    """Runs one fp32 collective of `numel` elements through a scheduler; the charges."""
    from zerocomm._ext import _C

    s = _C.SyncScheduler(_C.make_stream(-1), comm, 10_000)
    flat = torch.zeros(numel)
    if op == "all_gather":
        s.launch([s.add_param_bucket(flat, -1, "p", _C.Collective.ALL_GATHER)])
    else:
        coll = _C.Collective.REDUCE_SCATTER if op == "reduce_scatter" else _C.Collective.ALL_REDUCE
        shard = flat if op == "reduce_scatter" else torch.empty(0)
        g = s.add_grad_bucket(flat, shard, [], [], -1, "g", coll)
        s.reduce_grads(g, [], False)
    s.synchronize()
    return dict(_C.simulated_charges(comm))


def test_simulated_transport_charges_what_the_scale_model_predicts() -> None:
    """sim_transports(cluster, L) makes the simulated communicators charge a
    bucket exactly the scale model's all-gather, reduce-scatter and replica
    all-reduce of that bucket on layout L (and the flat layout)."""
    from zerocomm._ext import _C
    from zerocomm.transport import SimulatedTransport

    numel = 1 << 16
    nb = 4.0 * numel
    for L in (8, 2, 32):
        tr = SimulatedTransport(**sm.sim_transports(CLUSTER, L))
        ag, rs, ar = sm.layout_costs([nb], [nb], CLUSTER, L, "ring")

        def shard_comm() -> object:
            return _C.simulated_communicator(tr.latency_us, tr.bandwidth_gbps, tr.modelled_world)

        assert _charged(shard_comm(), "all_gather", numel)["seconds"] == pytest.approx(ag[0], rel=1e-9)
        assert _charged(shard_comm(), "reduce_scatter", numel)["seconds"] == pytest.approx(rs[0], rel=1e-9)
        rep = tr.replica_communicator()
        if L == 32:
            assert rep is None and ar == [0.0]
            continue
        got = _charged(rep, "all_reduce", numel)  # the process's whole bucket stands for its 1/L shard
        assert got["collectives"] == 1
        assert got["seconds"] == pytest.approx(ar[0], rel=1e-9)
        assert got["wire_bytes"] == pytest.approx(2 * (tr.replicas - 1) / tr.replicas * nb / L)


def test_simulated_charges_refuses_a_real_communicator_and_bad_fields() -> None:
    from zerocomm._ext import _C
    from zerocomm.transport import SimulatedTransport

    with pytest.raises(ValueError, match="shard_of >= 1"):
        _C.simulated_communicator(1.0, 1.0, 2, shard_of=0)
    with pytest.raises(ValueError, match="modelled world >= 1"):
        SimulatedTransport(replicas=0).replica_communicator()
    assert SimulatedTransport().replica_communicator() is None
    assert math.isclose(_C.simulated_charges(_C.simulated_communicator(0.0, 1.0, 2))["seconds"], 0.0)


def test_scale_model_hier_only_cli(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run(
        [sys.executable, "benchmarks/scale_model.py", "--hier-only", "--nodes", "4", f"--out={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "scale_model_hier.json").read_text())
    assert set(rep["grid"]) == set(sm.TWO_TIER_MODELS)
    assert set(rep["grid"]["7B"]) == {str(w) for w in sm.TWO_TIER_WORLDS}
    assert rep["cluster"]["world"] == 32 and "<- recommended" in p.stdout
    assert (tmp_path / "scale_model_hier.png").stat().st_size > 0


def test_hier_sim_charges_the_predicted_sync_in_both_layouts(tmp_path: Path) -> None:
    """benchmarks/hier_sim.py as a user runs it, tiny and at GPU speed: the
    hierarchical run goes through zerocomm's replica stage (one all-reduce per
    gradient bucket on the replica tier) and both layouts are charged exactly
    the scale model's prediction; both train the same model."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = ["--dim=32", "--layers=2", "--heads=2", "--seq=16", "--vocab=64", "--batch=2", "--bucket-mb=0.01"]
    args += ["--warmup=2", "--steps=2", "--rounds=1", "--slowdown=1", "--nodes=2", "--gpus-per-node=4"]
    p = subprocess.run(
        [sys.executable, "benchmarks/hier_sim.py", *args, f"--out={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "hier_sim.json").read_text())
    flat, node = rep["runs"]["8"], rep["runs"]["4"]
    n = len(node["bucket_bytes"])
    assert n > 1 and set(rep["acceptance"]) == {"hier_within_tolerance", "hier_exposed_below_flat"}
    assert node["charged_per_step"]["shard"]["collectives"] == 2 * n  # all-gather + reduce-scatter
    assert node["charged_per_step"]["replica"]["collectives"] == n
    assert "replica" not in flat["charged_per_step"]
    for r in (flat, node):
        assert r["ratio_charged"] == pytest.approx(1.0, rel=1e-9)
    assert flat["losses"] == node["losses"]  # the simulated tiers only cost time
