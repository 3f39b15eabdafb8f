"""Sharded checkpoints (zerocomm.checkpoint) on gloo ranks.

Training runs on a global batch that every rank slices evenly (grads are
averaged), so a single-process unsharded AdamW on the whole batch is the
reference: 3 steps on 4 ranks, save, resume on 2 and on 3 ranks (same mode
and the other mode) for 3 more steps must end where 6 uninterrupted
reference steps end. Resumed models start from a different seed, so nothing
matches unless the checkpoint really restored it. An LR scheduler whose
next step keeps the group's current lr checks that the param groups'
hyper-parameters round-trip.

Each spawned job groups several checks: starting a rank costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch import nn

MODES = ("broadcast", "allgather")
VOCAB, SEQ, BATCH = 64, 16, 12  # 12 sequences: divisible by 4, 3 and 2 ranks
LR, SAVE_AT, TOTAL = 1e-2, 3, 6
BUCKET_MB = 0.01  # several buckets, allgather slices that cut through parameters


# --------------------------------------------------------------------- helpers
# (module level: spawned ranks unpickle the job functions by name)


def _model(seed: int = 0) -> nn.Module:
    from zerocomm.testing.models import TinyGPT

    # qkv_bias=False: the key bias has a zero true gradient that Adam would
    # turn into lr-sized steps of rounding noise (see zerocomm.testing.models).
    return TinyGPT(vocab=VOCAB, dim=32, n_layers=2, n_heads=4, seq=SEQ, qkv_bias=False, seed=seed)


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95)
    )


def _scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    # Chainable: steps that do not decay keep the group's CURRENT lr, so a
    # resume that failed to restore it would train with the wrong one.
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _train(model: nn.Module, opt, sched, steps: range, rank: int = 0, world: int = 1) -> None:
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for s in steps:
        x, y = _batch(s)
        model.loss(x[rows], y[rows]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(n.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _reference(steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = _optimizer(model)
    _train(model, opt, _scheduler(opt), range(steps))
    return model, opt


def _assert_close_params(got: dict[str, torch.Tensor], want: nn.Module, what: str) -> None:
    # atol: data-parallel grad sums differ from the single-process ones in the
    # last bit, and Adam turns that into ~1e-6 on a few near-cancelling
    # elements even without any checkpoint; a broken resume moves params by ~lr.
    want_p = _params(want)
    assert got.keys() == want_p.keys(), what
    worst = max(float((got[n] - want_p[n]).abs().max()) for n in got)
    print(f"{what}: max |diff| {worst:.2e}")
    for n in got:
        torch.testing.assert_close(got[n], want_p[n], rtol=1e-5, atol=3e-5, msg=lambda m: f"{what}: {n}: {m}")


def _assert_same_optimizer_state(a: dict, b: dict, what: str) -> None:
    assert a["state"].keys() == b["state"].keys(), what
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys(), (what, i)
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), f"{what}: state[{i}][{k}] differs"
    assert a["param_groups"] == b["param_groups"], what


def _leftovers(path: str) -> list[str]:
    """Temp directories and lock files of saves to `path` (hidden, beside it)."""
    parent, name = os.path.split(os.path.abspath(path))
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}."))


def _file_hashes(path: str) -> dict[str, str]:
    out = {}
    for f in sorted(os.listdir(path)):
        with open(os.path.join(path, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


# ------------------------------------------------------------------------ jobs


def _job_train_and_save(rank: int, world: int, root: str) -> dict:
    """Both modes: 3 steps, saved twice into the same path (the second save
    replaces the first). Returns rank 0's parameters after 3 steps."""
    import zerocomm
    from zerocomm import checkpoint

    out = {}
    for mode in MODES:
        model = _model()
        opt = _optimizer(model)
        zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=BUCKET_MB)
        assert len(zopt.plan.buckets) >= 3, "want several buckets"
        sched = _scheduler(zopt)
        path = os.path.join(root, mode)
        _train(model, zopt, sched, range(SAVE_AT - 1), rank, world)
        checkpoint.save(path, zopt, step=SAVE_AT - 1, extra={"sched": sched.state_dict()})
        _train(model, zopt, sched, range(SAVE_AT - 1, SAVE_AT), rank, world)
        checkpoint.save(path, zopt, step=SAVE_AT, extra={"sched": sched.state_dict()})
        assert _leftovers(path) == []
        assert not os.path.exists(path + checkpoint.OLD_SUFFIX)
        out[mode] = _params(model)
        zopt.close()
    # bf16 parameters with fp32 master shards: the masters must be saved
    model = _model().to(torch.bfloat16)
    zopt = zerocomm.attach(model, _optimizer(model), mode="allgather", bucket_mb=BUCKET_MB, master_dtype=torch.float32)
    _train(model, zopt, _scheduler(zopt), range(2), rank, world)
    checkpoint.save(os.path.join(root, "bf16"), zopt, step=2)
    zopt.close()
    return out if rank == 0 else {}


def _job_resume(rank: int, world: int, root: str, pairs: list[tuple[str, str]], scratch: str) -> dict:
    """Per (saved mode, resume mode): load into a differently seeded model,
    check the restored optimizer state against the consolidated checkpoint,
    train 3 more steps. Returns rank 0's final parameters and all digests."""
    import zerocomm
    from zerocomm import checkpoint

    out = {}
    for src, mode in pairs:
        model = _model(seed=1)
        opt = _optimizer(model)
        zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=BUCKET_MB)
        sched = _scheduler(zopt)
        assert zopt.state_dict()["state"] == {}  # nothing stepped yet: all of it comes from the file
        step, extra = checkpoint.load(os.path.join(root, src), zopt)
        sched.load_state_dict(extra["sched"])
        assert step == SAVE_AT
        # lr after 3 StepLR steps (halved once), and per-group weight decay
        assert [g["lr"] for g in zopt.param_groups] == [LR * 0.5, LR * 0.5]
        assert [g["weight_decay"] for g in zopt.param_groups] == [0.1, 0.0]
        full = zopt.state_dict()  # consolidated over the NEW ownership
        if rank == 0:
            saved = checkpoint.consolidate(os.path.join(root, src), os.path.join(scratch, f"{src}-{mode}.pt"))
            _assert_same_optimizer_state(full, saved["optimizer"], f"{src}->{mode} on {world}")
            assert all(torch.equal(p, saved["model"][n]) for n, p in model.named_parameters())
        _train(model, zopt, sched, range(SAVE_AT, TOTAL), rank, world)
        zopt.synchronize()
        out[(src, mode)] = {"digest": _digest(model), "params": _params(model) if rank == 0 else None}
        zopt.close()
    if world == 3:  # the bf16 checkpoint of 4 allgather ranks, in broadcast mode
        path = os.path.join(root, "bf16")
        saved = checkpoint.consolidate(path, os.path.join(scratch, f"bf16-{rank}.pt"))
        model = _model(seed=1).to(torch.bfloat16)
        zopt = zerocomm.attach(
            model, _optimizer(model), mode="broadcast", bucket_mb=BUCKET_MB, master_dtype=torch.float32
        )
        checkpoint.load(path, zopt)
        assert all(torch.equal(p, saved["model"][n]) for n, p in model.named_parameters())
        names = dict((id(p), n) for n, p in model.named_parameters())
        owned = [(names[id(zopt.user_params[lp.index])], lp.tensor) for lp in zopt.pieces]
        for n, master in owned:
            assert master.dtype == torch.float32
            assert torch.equal(master.reshape(-1), saved["master"][n]), f"master of {n} not restored"
        # the fp32 masters carry more than their bf16 copies (the test is not vacuous)
        assert any(not torch.equal(m.reshape(-1), saved["model"][n].float().reshape(-1)) for n, m in owned)
        _train(model, zopt, _scheduler(zopt), range(2, 3), rank, world)
        zopt.synchronize()
        out["bf16"] = {"digest": _digest(model), "params": None}
        zopt.close()
    return out


def _crash_in_writer_on_rank(victim: int) -> None:
    """The victim rank dies right after writing its data files, before the
    checkpoint's metadata exists."""
    import torch.distributed.checkpoint as dcp

    orig = dcp.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        fut = orig(self, plan, planner)
        fut.wait()
        if dist.get_rank() == victim:
            os._exit(3)
        return fut

    dcp.FileSystemWriter.write_data = write_then_die


def _job_crash_while_writing(rank: int, world: int, path: str, info: str) -> bool:
    import zerocomm
    from zerocomm import checkpoint

    model = _model()
    opt = _optimizer(model)
    zopt = zerocomm.attach(model, opt, mode="allgather", bucket_mb=BUCKET_MB)
    sched = _scheduler(zopt)
    _train(model, zopt, sched, range(2), rank, world)
    checkpoint.save(path, zopt, step=2, extra={"sched": sched.state_dict()})
    full = zopt.state_dict()
    if rank == 0:
        torch.save(full, info + ".optim.pt")
        with open(info, "w") as f:
            json.dump({"digest": _digest(model), "files": _file_hashes(path)}, f)
    dist.barrier()
    _train(model, zopt, sched, range(2, 3), rank, world)
    _crash_in_writer_on_rank(1)
    checkpoint.save(path, zopt, step=3, timeout=15)  # rank 1 dies inside; rank 0 must not get past it
    return True


def _job_resume_after_crash(rank: int, world: int, path: str, info: str) -> bool:
    """Load what survived the crash on another world size and in the other
    mode, save over it, then die between the two renames of a further save."""
    import zerocomm
    from zerocomm import checkpoint

    with open(info) as f:
        before = json.load(f)
    model = _model(seed=1)
    opt = _optimizer(model)
    zopt = zerocomm.attach(model, opt, mode="broadcast", bucket_mb=BUCKET_MB)
    sched = _scheduler(zopt)
    step, extra = checkpoint.load(path, zopt)
    assert step == 2
    assert _digest(model) == before["digest"], "the previous checkpoint's parameters changed"
    _assert_same_optimizer_state(zopt.state_dict(), torch.load(info + ".optim.pt"), "after crash")
    sched.load_state_dict(extra["sched"])
    _train(model, zopt, sched, range(2, 3), rank, world)
    checkpoint.save(path, zopt, step=3)
    assert _leftovers(path) == []
    zopt.synchronize()
    if rank == 0:
        with open(info, "w") as f:
            json.dump({"digest": _digest(model)}, f)
    _train(model, zopt, sched, range(3, 4), rank, world)
    if rank == 0:
        from zerocomm import _ckpt_fs

        real_replace, real_rename = _ckpt_fs.replace_dir, os.rename

        def rename_then_die(src: str, dst: str) -> None:
            real_rename(src, dst)
            os._exit(4)  # the old checkpoint moved aside, the new one not yet in place

        def replace_and_die(tmp: str, dst: str, old: str) -> None:
            os.rename = rename_then_die  # only here: DCP renames files of its own
            real_replace(tmp, dst, old)

        _ckpt_fs.replace_dir = replace_and_die
    checkpoint.save(path, zopt, step=4, timeout=30)
    return True


def _job_recover(rank: int, world: int, path: str, info: str) -> int:
    """After a crash between the renames: load finds the previous checkpoint
    and the next save puts everything back in order."""
    import zerocomm
    from zerocomm import checkpoint

    with open(info) as f:
        before = json.load(f)
    model = _model(seed=1)
    zopt = zerocomm.attach(model, _optimizer(model), mode="allgather", bucket_mb=BUCKET_MB)
    step, _ = checkpoint.load(path, zopt)
    assert _digest(model) == before["digest"]
    checkpoint.save(path, zopt, step=step)  # breaks the dead rank 0's lock, tidies up
    assert os.path.exists(os.path.join(path, ".metadata"))
    assert not os.path.exists(path + checkpoint.OLD_SUFFIX)
    assert _leftovers(path) == []
    zopt.close()
    return step


# ----------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("ckpt"))
    res = run_ranks(_job_train_and_save, 4, root, timeout=180)
    return root, res[0]


def test_sharded_training_matches_reference_and_is_sharded(saved):
    from torch.distributed.checkpoint import FileSystemReader

    root, params = saved
    ref, _ = _reference(SAVE_AT)
    for mode in MODES:
        _assert_close_params(params[mode], ref, f"{mode} after {SAVE_AT} steps")
    # allgather: element-wise state written as several pieces of one tensor
    md = FileSystemReader(os.path.join(root, "allgather")).read_metadata().state_dict_metadata
    split = [k for k, v in md.items() if k.endswith(".exp_avg") and len(v.chunks) > 1]
    assert split, "no parameter's optimizer state was split across ranks"
    assert len({f for f in os.listdir(os.path.join(root, "allgather")) if f.endswith(".distcp")}) == 4


@pytest.mark.parametrize(
    "world,pairs",
    [
        (2, [("broadcast", "broadcast"), ("allgather", "broadcast")]),
        (3, [("allgather", "allgather"), ("broadcast", "allgather")]),
    ],
)
def test_resume_on_other_world_size_and_mode(saved, tmp_path, world, pairs):
    root, _ = saved
    res = run_ranks(_job_resume, world, root, pairs, str(tmp_path), timeout=180)
    ref, _ = _reference(TOTAL)
    for pair in pairs + (["bf16"] if world == 3 else []):
        assert len({r[pair]["digest"] for r in res}) == 1, f"{pair}: ranks disagree"
    for pair in pairs:
        _assert_close_params(res[0][pair]["params"], ref, f"{pair[0]} on 4 -> {pair[1]} on {world}")


@pytest.mark.parametrize("mode", MODES)
def test_consolidate_loads_into_plain_torch(saved, tmp_path, mode):
    from zerocomm.checkpoint import consolidate

    root, _ = saved
    out_file = tmp_path / "full.pt"
    consolidate(os.path.join(root, mode), out_file)
    full = torch.load(out_file)  # plain torch.load (weights_only)
    assert full["step"] == SAVE_AT
    model = _model(seed=1)
    model.load_state_dict(full["model"])
    opt = _optimizer(model)
    opt.load_state_dict(full["optimizer"])
    sched = _scheduler(opt)
    sched.load_state_dict(full["extra"]["sched"])
    # same state as the unsharded reference after 3 steps, in torch's own format
    ref_sd, got_sd = _reference(SAVE_AT)[1].state_dict(), opt.state_dict()
    assert got_sd["param_groups"] == ref_sd["param_groups"]
    assert got_sd["state"].keys() == ref_sd["state"].keys()
    for i, st in ref_sd["state"].items():
        got = got_sd["state"][i]
        assert float(got["step"]) == float(st["step"]) == SAVE_AT
        for k in ("exp_avg", "exp_avg_sq"):  # atol: last-bit grad noise, relative to the tensor's scale
            torch.testing.assert_close(got[k], st[k], rtol=1e-5, atol=1e-4 * float(st[k].abs().max()))
    _train(model, opt, sched, range(SAVE_AT, TOTAL))
    _assert_close_params(_params(model), _reference(TOTAL)[0], f"consolidated {mode}, continued in torch")


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    from zerocomm.checkpoint import OLD_SUFFIX, consolidate

    path, info = str(tmp_path / "ckpt"), str(tmp_path / "info.json")
    res = run_ranks(_job_crash_while_writing, 2, path, info, timeout=120, expect_errors=True)
    assert all("error" in r for r in res), res  # rank 1 died, rank 0 did not complete the save
    assert res[0]["type"] == "CheckpointError" and not res[0]["killed"], res[0]
    with open(info) as f:
        before = json.load(f)
    assert _file_hashes(path) == before["files"], "the previous checkpoint was modified"
    assert _leftovers(path) == [], "rank 0 removes its failed save's temp and releases the lock"

    # loads on 3 ranks in the other mode; then a crash between the renames
    res = run_ranks(_job_resume_after_crash, 3, path, info, timeout=120, expect_errors=True)
    assert res[0]["type"] == "Hang", res[0]  # rank 0 exited inside the rename step
    assert not os.path.exists(path) and os.path.exists(path + OLD_SUFFIX)
    full = consolidate(path, tmp_path / "full.pt")  # finds the complete previous checkpoint
    assert full["step"] == 3

    assert run_ranks(_job_recover, 1, path, info, timeout=90) == [3]
