"""Checkpoints of state sharded over sub-groups (issue 21), on gloo ranks.

Expert groups: 4 ranks as 2 expert groups of 2 ([0, 1], [2, 3]; in
allgather mode with the dense plan hierarchical, 2 shard groups x 2
replicas). The
experts start different in each group (expert parallelism: each group holds
its own experts under the same names) and train on that group's half of the
global batch, the dense parameters on all of it. The single-process
reference keeps one model per expert group with the dense parameters shared
between them (dense gradients averaged over the groups). A checkpoint saved
after 2 steps, resumed in the other mode on 4 ranks and on 2 ranks (expert
groups [0], [1]) for 2 more steps, must end where the reference ends; resumed
models start from another seed with the same experts in both groups, so
nothing matches unless the checkpoint restored each group's own experts.

Hierarchical: 2 shard groups x 2 replicas ([0, 1], [2, 3]; replicas [0, 2],
[1, 3]) -> flat 4x1 -> flat 2x1 -> 2x2, one step of training between
loads, the modes alternating (two chains, so every layout is saved and
loaded in both modes). Every load restores the saved parameters and the
optimizer state bitwise on every rank, and the end equals single-process
torch on the global batch.

Starting ranks costs seconds: three jobs (4, 2, 4 ranks) run every case.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch import nn

MODES = ("broadcast", "allgather")
VOCAB, SEQ, BATCH = 32, 8, 8  # 8 sequences: 2 per rank on 4 ranks, 4 per expert group
LR, SAVE_AT, TOTAL = 1e-2, 2, 4
BUCKET_MB = 0.004  # several buckets, allgather slices that cut through parameters
N_GROUPS = 2  # expert groups


# --------------------------------------------------------------------- helpers
# (module level: spawned ranks unpickle the job functions by name)


def _is_expert(name: str, param: nn.Parameter | None = None) -> bool:
    return ".experts." in name


def _model(seed: int = 0, expert_group: int | None = None) -> nn.Module:
    """TinyGPT with 2 experts per layer; `expert_group`: that group's own
    experts (a group-specific offset), None: the same experts everywhere."""
    from zerocomm.testing.models import TinyGPT

    model = TinyGPT(vocab=VOCAB, dim=16, n_layers=2, n_heads=2, seq=SEQ, qkv_bias=False, n_experts=2, seed=seed)
    if expert_group is not None:
        g = torch.Generator().manual_seed(50 + expert_group)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if _is_expert(n):
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _optimizer(params: list[nn.Parameter]) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95)
    )


def _scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    # Chainable: a resume that failed to restore the current lr trains with the wrong one.
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _rows(part: int, parts: int) -> slice:
    return slice(part * BATCH // parts, (part + 1) * BATCH // parts)


def _train(model: nn.Module, opt, sched, steps: range, rank: int, world: int) -> None:
    for s in steps:
        x, y = _batch(s)
        model.loss(x[_rows(rank, world)], y[_rows(rank, world)]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _expert_group(world: int) -> tuple[dist.ProcessGroup, int]:
    """The expert groups: [0, 1], [2, 3] on 4 ranks, [0], [1] on 2 (every
    rank creates all of them); returns this rank's and its index."""
    size = world // N_GROUPS
    groups = [dist.new_group(ranks=list(range(s, s + size))) for s in range(0, world, size)]
    index = dist.get_rank() // size
    return groups[index], index


def _attach(model: nn.Module, mode: str, egroup, **layout):
    import zerocomm

    opt = _optimizer(list(model.parameters()))
    zopt = zerocomm.attach(
        model, opt, mode=mode, bucket_mb=BUCKET_MB, expert_filter=_is_expert, expert_group=egroup, **layout
    )
    return zopt, _scheduler(zopt)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@functools.cache
def _reference(steps: int) -> list[dict[str, torch.Tensor]]:
    """Single-process torch: one model per expert group, dense parameters
    shared; each group's loss on its half of the batch; expert gradients
    are that group's, dense gradients averaged over the groups (what 2
    expert groups of 2 ranks compute). Returns each group's parameters."""
    models = [_model(0, g) for g in range(N_GROUPS)]
    shared = dict(models[0].named_parameters(remove_duplicate=False))
    for m in models[1:]:  # tie every dense parameter (and its aliases) to model 0's
        for name, _ in list(m.named_parameters(remove_duplicate=False)):
            if not _is_expert(name):
                mod_name, _, attr = name.rpartition(".")
                setattr(m.get_submodule(mod_name), attr, shared[name])
    params = list({id(p): p for m in models for p in m.parameters()}.values())
    dense = [p for p in models[0].parameters() if all(p is not e for e in _experts(models[0]))]
    opt = _optimizer(params)
    sched = _scheduler(opt)
    for s in range(steps):
        x, y = _batch(s)
        for g, m in enumerate(models):
            m.loss(x[_rows(g, N_GROUPS)], y[_rows(g, N_GROUPS)]).backward()
        for p in dense:
            p.grad.div_(N_GROUPS)
        opt.step()
        opt.zero_grad()
        sched.step()
    return [_params(m) for m in models]


def _experts(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_expert(n)]


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max(float((got[n] - want[n]).abs().max()) for n in got)


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    # atol: data-parallel sums differ from the reference's in the last bit and
    # Adam turns that into ~1e-6 on near-cancelling elements; a wrong resume
    # moves parameters by ~lr.
    print(f"{what}: max |diff| {_max_diff(got, want):.2e}")
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=3e-5, msg=lambda m: f"{what}: {n}: {m}")


def _same_state(a: dict, b: dict) -> bool:
    if a["state"].keys() != b["state"].keys() or a["param_groups"] != b["param_groups"]:
        return False
    for i, st in a["state"].items():
        if st.keys() != b["state"][i].keys():
            return False
        if not all(torch.equal(v, b["state"][i][k]) for k, v in st.items()):
            return False
    return True


# ------------------------------------------------------------- hierarchical

# modes of the 2x2 save, the 4x1, 2x1 and final 2x2 loads, per chain
CHAINS = {
    "A": ("broadcast", "allgather", "broadcast", "allgather"),
    "B": ("allgather", "broadcast", "allgather", "broadcast"),
}
HOPS = ("2x2", "4x1", "2x1", "2x2")  # shard-group size x replicas; one step of training after each load


def _dense_model(seed: int = 0) -> nn.Module:
    from zerocomm.testing.models import TinyGPT

    return TinyGPT(vocab=VOCAB, dim=16, n_layers=2, n_heads=2, seq=SEQ, qkv_bias=False, seed=seed)


@functools.cache
def _dense_reference(steps: int) -> dict[str, torch.Tensor]:
    model = _dense_model()
    opt = _optimizer(list(model.parameters()))
    _train(model, opt, _scheduler(opt), range(steps), 0, 1)
    return _params(model)


def _layout(hop: str, world: int) -> dict:
    """attach's layout arguments for `hop` on `world` ranks (every rank
    creates every group: new_group is collective)."""
    if hop != "2x2":
        return {}
    shard = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rep = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    rank = dist.get_rank()
    return dict(shard_group=shard[rank // 2], replicate_group=rep[rank % 2])


def _hier_hop(rank: int, world: int, root: str, hop: int, chain: str) -> dict:
    """Hop `hop` of `chain`: attach in that hop's layout and mode, load the
    previous hop's checkpoint (hop 0: train from scratch), record what was
    loaded, train one step (hop 0: SAVE_AT steps) and save."""
    import zerocomm
    from zerocomm import checkpoint

    mode, layout = CHAINS[chain][hop], _layout(HOPS[hop], world)
    model = _dense_model(seed=0 if hop == 0 else 1)
    zopt = zerocomm.attach(model, _optimizer(list(model.parameters())), mode=mode, bucket_mb=BUCKET_MB, **layout)
    sched = _scheduler(zopt)
    lay = zopt.layouts["dense"]
    out: dict = {"layout": (lay.shard_size, lay.replica_size)}
    start = 0
    if hop > 0:
        start, extra = checkpoint.load(os.path.join(root, f"{chain}{hop - 1}"), zopt)
        sched.load_state_dict(extra["sched"])
        zopt.synchronize()
        out["loaded"] = _params(model)
        out["loaded_state"] = zopt.state_dict()  # consolidated over this rank's shard group
    steps = range(start, start + (SAVE_AT if hop == 0 else 1))
    _train(model, zopt, sched, steps, rank, world)
    checkpoint.save(os.path.join(root, f"{chain}{hop}"), zopt, step=steps.stop, extra={"sched": sched.state_dict()})
    zopt.synchronize()
    out["saved"] = _params(model)
    out["saved_state"] = zopt.state_dict()
    zopt.close()
    return out


def _hier(rank: int, world: int, root: str, hops: tuple[int, ...]) -> dict:
    return {(chain, hop): _hier_hop(rank, world, root, hop, chain) for chain in CHAINS for hop in hops}


# ------------------------------------------------------------------------ jobs


def _job_stage(rank: int, world: int, root: str, stage: int) -> dict:
    """Stage 1 (4 ranks): the expert groups' saves and resumes, the 2x2 saves
    and their 4x1 loads. Stage 2 (2 ranks): the expert checkpoints on 2
    ranks, the 2x1 hop. Stage 3 (4 ranks): the last 2x2 hop."""
    out: dict = {}
    if stage == 1:
        out["experts"] = _experts_save(rank, world, os.path.join(root, "experts"))
        out["hier"] = _hier(rank, world, root, (0, 1))
    elif stage == 2:
        out["experts"] = _experts_resume(rank, world, os.path.join(root, "experts"))
        out["hier"] = _hier(rank, world, root, (2,))
    else:
        out["hier"] = _hier(rank, world, root, (3,))
    return out


def _experts_save(rank: int, world: int, root: str) -> dict:
    """Both modes on 2 expert groups of 2: 2 steps, save, 2 more steps
    (uninterrupted). Then the other mode's checkpoint resumed on the same
    layout. Returns, per rank, what the tests compare."""
    from zerocomm import checkpoint

    egroup, index = _expert_group(world)
    out: dict = {"index": index}
    for mode in MODES:
        model = _model(0, index)
        # allgather: the dense plan hierarchical (2 shard groups x 2 replicas), the experts flat over their groups
        layout = _layout("2x2", world) if mode == "allgather" else {}
        zopt, sched = _attach(model, mode, egroup, **layout)
        out[f"layout/{mode}"] = {k: (v.shard_size, v.replica_size) for k, v in zopt.layouts.items()}
        assert [p.name for p in zopt.sharded_plans] == ["dense", "expert"]
        _train(model, zopt, sched, range(SAVE_AT), rank, world)
        path = os.path.join(root, mode)
        checkpoint.save(path, zopt, step=SAVE_AT, extra={"sched": sched.state_dict()})
        zopt.synchronize()
        out[f"saved/{mode}"] = _params(model)
        out[f"saved_state/{mode}"] = zopt.state_dict()  # this expert group's, consolidated
        _train(model, zopt, sched, range(SAVE_AT, TOTAL), rank, world)
        zopt.synchronize()
        out[f"final/{mode}"] = _params(model)
        zopt.close()
    for src, mode in (("allgather", "broadcast"), ("broadcast", "allgather")):
        model = _model(seed=1)  # other weights; the same experts in both groups
        zopt, sched = _attach(model, mode, egroup)
        step, extra = checkpoint.load(os.path.join(root, src), zopt)
        sched.load_state_dict(extra["sched"])
        assert step == SAVE_AT
        zopt.synchronize()
        out[f"loaded/{src}->{mode}"] = _params(model)
        out[f"loaded_state/{src}->{mode}"] = zopt.state_dict()
        _train(model, zopt, sched, range(SAVE_AT, TOTAL), rank, world)
        zopt.synchronize()
        out[f"resumed/{src}->{mode}"] = _params(model)
        zopt.close()
    return out


def _experts_resume(rank: int, world: int, root: str) -> dict:
    """2 ranks, expert groups [0] and [1]: each mode's 4-rank checkpoint in
    the other mode, continued; then the refusals."""
    from zerocomm import checkpoint

    egroup, index = _expert_group(world)
    out: dict = {"index": index}
    for src, mode in (("broadcast", "allgather"), ("allgather", "broadcast")):
        model = _model(seed=1)
        zopt, sched = _attach(model, mode, egroup)
        step, extra = checkpoint.load(os.path.join(root, src), zopt)
        sched.load_state_dict(extra["sched"])
        zopt.synchronize()
        out[f"loaded/{src}->{mode}"] = _params(model)
        _train(model, zopt, sched, range(SAVE_AT, TOTAL), rank, world)
        zopt.synchronize()
        out[f"resumed/{src}->{mode}"] = _params(model)
        zopt.close()
    # one set of experts for all ranks: the checkpoint's two sets do not map onto it
    model = _model(seed=1)
    before = _params(model)
    zopt, _ = _attach(model, "allgather", None)
    try:
        checkpoint.load(os.path.join(root, "allgather"), zopt, timeout=30)
        out["flat_load"] = None
    except Exception as e:
        out["flat_load"] = f"{type(e).__name__}: {e}"
    zopt.synchronize()
    out["flat_load_unchanged"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    out["flat_load_state_empty"] = zopt.state_dict()["state"] == {}
    zopt.close()
    return out


# ----------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[str, dict[int, list[dict]]]:
    """Each stage's per-rank results, run once for the module (lazily: the
    next stage starts when a test needs it)."""
    root = str(tmp_path_factory.mktemp("ckpt"))
    return root, {}


def _stage(stages, stage: int) -> list[dict]:
    root, done = stages
    for s in range(1, stage + 1):
        if s not in done:
            done[s] = run_ranks(_job_stage, 2 if s == 2 else 4, root, s, timeout=240)
    return done[stage]


@pytest.fixture(scope="module")
def experts(stages) -> tuple[str, list[dict]]:
    return os.path.join(stages[0], "experts"), [r["experts"] for r in _stage(stages, 1)]


def test_expert_groups_train_like_the_reference_and_save_each_groups_experts(experts):
    from torch.distributed.checkpoint import FileSystemReader

    root, res = experts
    ref = _reference(TOTAL)
    assert res[0]["layout/allgather"] == {"dense": (2, 2), "expert": (2, 1)}
    assert res[0]["layout/broadcast"] == {"dense": (4, 1), "expert": (2, 1)}
    for mode in MODES:
        for r, got in enumerate(res):
            if r % 2 == 0:
                _assert_close(got[f"final/{mode}"], ref[got["index"]], f"{mode}, rank {r}, {TOTAL} steps")
            else:  # ranks of one expert group are bitwise equal
                assert all(torch.equal(v, res[r - 1][f"final/{mode}"][n]) for n, v in got[f"final/{mode}"].items())
        # the groups' experts really differ (else one saved copy would pass)
        assert _max_diff(res[0][f"final/{mode}"], res[2][f"final/{mode}"]) > 0.1
        md = FileSystemReader(os.path.join(root, mode)).read_metadata().state_dict_metadata
        expert_names = [n for n in res[0][f"saved/{mode}"] if _is_expert(n)]
        dense_names = [n for n in res[0][f"saved/{mode}"] if not _is_expert(n)]
        for g in range(N_GROUPS):
            assert all(f"experts.{g}.model.{n}" in md for n in expert_names)
            assert all(f"experts.{g}.optim.state.{n}.exp_avg" in md for n in expert_names)
        assert all(f"model.{n}" in md and f"optim.state.{n}.exp_avg" in md for n in dense_names)
        assert not any(f"model.{n}" in md for n in expert_names), "an expert saved without its group"
        # every saved tensor's chunks are disjoint and cover it exactly once
        for key, m in md.items():
            if hasattr(m, "chunks"):
                spans = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in m.chunks) if m.size else []
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), key
                assert not spans or (spans[0][0] == 0 and spans[-1][1] == m.size[0]), key


def test_expert_checkpoint_consolidates_per_group(experts, tmp_path):
    from zerocomm.checkpoint import consolidate

    root, res = experts
    for mode in MODES:
        path = os.path.join(root, mode)
        with pytest.raises(ValueError, match="expert_group=g"):
            consolidate(path, tmp_path / "x.pt")
        for r in (0, 2):
            full = consolidate(path, tmp_path / f"{mode}{r}.pt", expert_group=res[r]["index"])
            assert full["step"] == SAVE_AT
            saved = res[r][f"saved/{mode}"]
            assert full["model"].keys() == _model().state_dict().keys()
            assert all(torch.equal(full["model"][n], saved[n]) for n in saved)
            assert _same_state(full["optimizer"], res[r][f"saved_state/{mode}"]), f"{mode}: group of rank {r}"
            # loads into plain torch: model and AdamW of one expert group
            model = _model(seed=1)
            model.load_state_dict(full["model"])
            _optimizer(list(model.parameters())).load_state_dict(full["optimizer"])


def test_expert_checkpoint_resumes_in_either_mode(experts):
    _, res = experts
    ref = _reference(TOTAL)
    for pair in ("allgather->broadcast", "broadcast->allgather"):
        src = pair.split("->")[0]
        for r, got in enumerate(res):
            assert all(torch.equal(v, res[r][f"saved/{src}"][n]) for n, v in got[f"loaded/{pair}"].items()), pair
            assert _same_state(got[f"loaded_state/{pair}"], res[r][f"saved_state/{src}"]), (pair, r)
            _assert_close(got[f"resumed/{pair}"], ref[got["index"]], f"{pair} on 4, rank {r}")


def test_expert_checkpoint_resumes_on_fewer_ranks(stages, experts):
    _, saved = experts
    res = [r["experts"] for r in _stage(stages, 2)]
    ref = _reference(TOTAL)
    for r, got in enumerate(res):
        for pair in ("broadcast->allgather", "allgather->broadcast"):
            src = pair.split("->")[0]
            want = saved[2 * r][f"saved/{src}"]  # rank r is expert group r: ranks 2r, 2r+1 before
            assert all(torch.equal(v, want[n]) for n, v in got[f"loaded/{pair}"].items()), pair
            _assert_close(got[f"resumed/{pair}"], ref[got["index"]], f"{pair}, 4 -> 2 ranks, rank {r}")
        assert got["flat_load"] is not None and "2 expert groups" in got["flat_load"], got["flat_load"]
        assert got["flat_load_unchanged"] and got["flat_load_state_empty"]


def _hop(stages, hop: int) -> list[dict]:
    return [r["hier"] for r in _stage(stages, (1, 1, 2, 3)[hop])]


def _distcp_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))


def test_hierarchical_round_trip_2x2_4x1_2x1_2x2_is_exact(stages):
    sizes = {"2x2": (2, 2), "4x1": (4, 1), "2x1": (2, 1)}
    prev: list[dict] = []
    for hop in range(len(HOPS)):
        res = _hop(stages, hop)
        saved_at = SAVE_AT + hop
        for chain in CHAINS:
            what = f"chain {chain} ({'/'.join(CHAINS[chain])}), hop {hop} ({HOPS[hop]})"
            for r, got in enumerate(res):
                g = got[(chain, hop)]
                assert g["layout"] == sizes[HOPS[hop]], what
                if hop > 0:  # every rank loads exactly what the previous layout saved
                    before = prev[0][(chain, hop - 1)]
                    assert all(torch.equal(v, before["saved"][n]) for n, v in g["loaded"].items()), (what, r)
                    assert _same_state(g["loaded_state"], before["saved_state"]), (what, r)
                # ranks bitwise equal, replicas included
                assert all(torch.equal(v, res[0][(chain, hop)]["saved"][n]) for n, v in g["saved"].items()), (what, r)
                assert _same_state(g["saved_state"], res[0][(chain, hop)]["saved_state"]), (what, r)
            got = res[0][(chain, hop)]["saved"]
            worst = _max_diff(got, _dense_reference(saved_at))
            print(f"{what}: {saved_at} steps, max |diff| vs torch {worst:.2e}")
            assert worst < 1e-5, what
        prev = res


def test_hierarchical_save_writes_each_shard_once(stages):
    from torch.distributed.checkpoint import FileSystemReader

    root = stages[0]
    _stage(stages, 2)
    for chain in CHAINS:
        hier, flat = os.path.join(root, f"{chain}0"), os.path.join(root, f"{chain}2")  # 2x2 and 2x1, one mode
        md = FileSystemReader(hier).read_metadata().state_dict_metadata
        split = 0
        for key, m in md.items():
            if hasattr(m, "chunks") and len(m.size):
                spans = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in m.chunks)
                assert spans[0][0] == 0 and spans[-1][1] == m.size[0], (chain, key, spans)
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (chain, key, spans)  # no overlap
                split += len(spans) > 1
        assert CHAINS[chain][0] == "broadcast" or split, "allgather state should be split over the shard group"
        # the same shards as the flat 2x1 checkpoint holds, once: replicas do not write them again
        ratio = _distcp_bytes(hier) / _distcp_bytes(flat)
        print(f"chain {chain}: 2x2 / 2x1 checkpoint bytes {ratio:.3f}")
        assert 0.95 < ratio < 1.05, ratio


def test_expert_groups_are_checked_and_numbered_by_lowest_rank():
    """The ranks' reports -> expert groups (no process group needed)."""
    from zerocomm._ckpt_keys import Report, _value_sets

    def sets(shard: dict[int, tuple], replicas: dict[int, tuple] | None = None) -> list[tuple[int, ...]]:
        reports = {r: Report(r, g, (replicas or {}).get(r), None) for r, g in shard.items()}
        return _value_sets(reports, tuple(sorted(shard)))

    # strided expert groups (Megatron's expert-data-parallel groups): numbered by lowest rank
    assert sets({0: (0, 2), 1: (1, 3), 2: (0, 2), 3: (1, 3)}) == [(0, 2), (1, 3)]
    # an expert plan sharing a 2x2 layout: shard and replicate groups join every rank (one set)
    assert sets({0: (0, 1), 1: (0, 1), 2: (2, 3), 3: (2, 3)}, {0: (0, 2), 2: (0, 2), 1: (1, 3), 3: (1, 3)}) == [
        (0, 1, 2, 3)
    ]
    with pytest.raises(ValueError, match="rank 0 is in \\[0, 1\\] but rank 1 is in \\[1, 2\\]"):
        sets({0: (0, 1), 1: (1, 2), 2: (1, 2), 3: (3,)})  # overlapping groups
    with pytest.raises(ValueError, match="not a sub-group"):
        sets({0: (0, 4), 1: (1,)})  # a rank outside the checkpoint's ranks
