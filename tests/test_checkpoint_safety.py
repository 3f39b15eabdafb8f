"""Checkpoint safety (issue 11) on 2 gloo ranks, each job under a hard timeout.

Starting ranks costs seconds, so one job (module fixture) runs every
single-job case in turn and records, per case and rank, what happened; the
tests below then check one case each. Concurrent saves need two jobs of
their own.

Every checkpoint call in a job passes a short `timeout=`, so a case that
leaves the ranks out of step fails in seconds instead of hanging the job.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks

T = 20  # seconds: the `timeout=` of every checkpoint call in the jobs


# --------------------------------------------------------------------- helpers
# (module level: spawned ranks unpickle the job functions by name)


def _setup(*, n_layers: int = 2, vocab: int = 64, optim: str = "adamw", bf16: bool = True):
    """A stepped model: bf16 parameters with fp32 masters in allgather mode,
    so parameters, masters and optimizer state all differ from each other."""
    import zerocomm
    from zerocomm.testing.models import TinyGPT

    model = TinyGPT(vocab=vocab, dim=16, n_layers=n_layers, n_heads=2, seq=8, qkv_bias=False, seed=0)
    kwargs: dict[str, Any] = {}
    if bf16:
        model = model.to(torch.bfloat16)
        kwargs["master_dtype"] = torch.float32
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if optim == "adamw"
        else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    )
    zopt = zerocomm.attach(model, opt, mode="allgather", bucket_mb=0.002, **kwargs)
    _train(model, zopt, seed=dist.get_rank())
    return model, zopt


def _train(model, zopt, seed: int) -> None:
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    model.loss(x % model.wte.weight.shape[0], x % model.wte.weight.shape[0]).backward()
    zopt.step()
    zopt.zero_grad()


def _snapshot(model, zopt) -> dict[str, Any]:
    zopt.synchronize()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optim": zopt.state_dict(),  # collective: both ranks take snapshots in step
        "masters": [lp.tensor.detach().clone() for lp in zopt.pieces],
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if torch.is_tensor(x):
            return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(map(eq, x, y))
        return x == y

    return eq(a, b)


def _rank0_edits(fn: Callable[[], None]) -> None:
    """Rank 0 changes files, every rank waits until it has."""
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def _set_digest(ckpt: str, name: str) -> None:
    """Record a file's current sha256 in the marker: isolates what is being
    tested (the loader's own refusal) from the checksum check."""
    from zerocomm import _ckpt_fs

    marker_file = os.path.join(ckpt, _ckpt_fs.MARKER)
    with open(marker_file) as f:
        marker = json.load(f)
    marker["files"][name] = _ckpt_fs.sha256(os.path.join(ckpt, name))
    with open(marker_file, "w") as f:
        json.dump(marker, f)


def _run_side_effect(path: str, value: Any) -> Any:
    open(path, "w").close()
    return value


class _RunsCode:
    """Unpickling it creates `path` (with builtins.open: nothing to import)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _RunsCodeThenReturns:
    """Unpickling it creates `path`, then yields `value` (the genuine metadata)."""

    def __init__(self, path: str, value: Any) -> None:
        self.path, self.value = path, value

    def __reduce__(self):
        return (_run_side_effect, (self.path, self.value))


# ------------------------------------------------------------------------ jobs


def _case(results: dict[str, Any], name: str, fn: Callable[[], Any], *, every_rank: bool = True) -> None:
    t = time.monotonic()
    try:
        out = {"ok": fn()}
    except Exception as e:  # `except Exception` must catch everything checkpoint raises
        out = {"error": str(e), "type": type(e).__name__, "runtime": isinstance(e, RuntimeError)}
    out["seconds"] = time.monotonic() - t
    results[name] = out
    if every_rank:
        dist.barrier()


def _job_cases(rank: int, world: int, root: str) -> dict[str, Any]:
    from zerocomm import checkpoint

    res: dict[str, Any] = {}
    model, zopt = _setup()
    ck = os.path.join(root, "ck")

    # --- 1. existing paths that zerocomm did not write
    def user_files() -> None:
        os.makedirs(os.path.join(root, "outputs", "runs"))
        for f, text in (("train.log", "log"), ("runs/best_model.pt", "weights")):
            with open(os.path.join(root, "outputs", f), "w") as fh:
                fh.write(text)
        with open(os.path.join(root, "model.bin"), "w") as fh:
            fh.write("user data")

    _rank0_edits(user_files)
    _case(res, "user_dir", lambda: checkpoint.save(os.path.join(root, "outputs"), zopt, step=1, timeout=T))
    _case(res, "user_file", lambda: checkpoint.save(os.path.join(root, "model.bin"), zopt, step=1, timeout=T))

    # --- 3. trailing slash; a parent that cannot be written
    def trailing_slash() -> Any:
        checkpoint.save(os.path.join(root, "slash") + "/", zopt, step=5, timeout=T)
        return checkpoint.load(os.path.join(root, "slash") + "/", zopt, timeout=T).step

    _case(res, "trailing_slash", trailing_slash)
    _rank0_edits(lambda: open(os.path.join(root, "a_file"), "w").close())
    _case(res, "parent_is_file", lambda: checkpoint.save(os.path.join(root, "a_file", "ck"), zopt, timeout=T))
    if os.geteuid() != 0:  # root ignores permissions: the file parent above stands in for it
        _rank0_edits(lambda: (os.mkdir(os.path.join(root, "ro")), os.chmod(os.path.join(root, "ro"), 0o555)))
        _case(res, "read_only_parent", lambda: checkpoint.save(os.path.join(root, "ro", "ck"), zopt, timeout=T))

    # --- 9. extra round-trips any state_dict, empty containers included
    extra = {
        "sched": {
            "lr_lambdas": [{}, {}],
            "base_lrs": [0.1, 0.1],
            "_last_lr": [0.1, 0.1],
            "last_epoch": 3,
            "verbose": False,
        },
        "empty": {},
        "tup": (1, ()),
        "t": torch.arange(3),
        "none": None,
    }
    checkpoint.save(ck, zopt, step=7, extra=extra, timeout=T)
    _case(res, "extra_load", lambda: _same(checkpoint.load(ck, zopt, timeout=T).extra, extra))
    if rank == 0:
        full = checkpoint.consolidate(ck, os.path.join(root, f"full{rank}.pt"))
        res["extra_consolidate"] = {"ok": _same(full["extra"], extra)}

    # --- 4. no code from a file
    sentinel = os.path.join(root, "code_ran")
    _case(res, "payload_in_extra", lambda: checkpoint.save(ck, zopt, extra={"x": _RunsCode(sentinel)}, timeout=T))
    res["payload_in_extra"]["sentinel"] = os.path.exists(sentinel)

    def evil_entries() -> None:
        entries = torch.load(os.path.join(ck, "zerocomm.pt"), weights_only=True)
        torch.save({**entries, "extra": _RunsCode(sentinel)}, os.path.join(ck, "zerocomm.pt"))
        _set_digest(ck, "zerocomm.pt")

    _rank0_edits(evil_entries)
    _case(res, "payload_in_entries", lambda: checkpoint.load(ck, zopt, timeout=T))
    if rank == 0:
        _case(
            res,
            "payload_in_entries_consolidate",
            lambda: checkpoint.consolidate(ck, os.path.join(root, "x.pt")),
            every_rank=False,
        )
    res["payload_in_entries"]["sentinel"] = os.path.exists(sentinel)

    checkpoint.save(ck, zopt, step=8, timeout=T)

    def evil_metadata() -> None:
        from torch.distributed.checkpoint import FileSystemReader

        genuine = FileSystemReader(ck).read_metadata()
        with open(os.path.join(ck, ".metadata"), "wb") as f:
            pickle.dump(_RunsCodeThenReturns(sentinel, genuine), f)
        _set_digest(ck, ".metadata")

    _rank0_edits(evil_metadata)
    _case(res, "payload_in_metadata", lambda: checkpoint.load(ck, zopt, timeout=T))
    if rank == 0:
        _case(
            res,
            "payload_in_metadata_consolidate",
            lambda: checkpoint.consolidate(ck, os.path.join(root, "y.pt")),
            every_rank=False,
        )
    res["payload_in_metadata"]["sentinel"] = os.path.exists(sentinel)
    # opting in: the user vouches for the file, and then it loads
    _case(res, "metadata_trusted", lambda: checkpoint.load(ck, zopt, timeout=T, trusted=True).step)
    res["metadata_trusted"]["sentinel"] = os.path.exists(sentinel)

    # --- 5, 6. a flipped byte; a truncated file (DCP fails mid-read); nothing changes
    checkpoint.save(ck, zopt, step=9, timeout=T)
    _train(model, zopt, seed=10 + rank)  # the live state now differs from the checkpoint's

    def flip() -> None:
        with open(os.path.join(ck, "__1_0.distcp"), "r+b") as f:
            f.seek(200)
            b = f.read(1)
            f.seek(200)
            f.write(bytes([b[0] ^ 0x10]))

    _rank0_edits(flip)
    before = _snapshot(model, zopt)
    _case(res, "flipped_byte", lambda: checkpoint.load(ck, zopt, timeout=T))
    res["flipped_byte"]["unchanged"] = _same(_snapshot(model, zopt), before)
    if rank == 0:
        _case(
            res,
            "flipped_byte_consolidate",
            lambda: checkpoint.consolidate(ck, os.path.join(root, "z.pt")),
            every_rank=False,
        )

    checkpoint.save(ck, zopt, step=10, timeout=T)
    _train(model, zopt, seed=20 + rank)

    def truncate() -> None:
        file = os.path.join(ck, "__1_0.distcp")
        os.truncate(file, os.path.getsize(file) // 2)
        _set_digest(ck, "__1_0.distcp")

    _rank0_edits(truncate)
    before = _snapshot(model, zopt)
    _case(res, "truncated", lambda: checkpoint.load(ck, zopt, timeout=T))
    res["truncated"]["unchanged"] = _same(_snapshot(model, zopt), before)
    checkpoint.save(ck, zopt, step=11, timeout=T)
    zopt.close()

    # --- 7. wrong optimizer, fewer layers, other shapes: refused, nothing changes
    for name, kwargs in (("sgd", {"optim": "sgd"}), ("fewer_layers", {"n_layers": 1}), ("shape", {"vocab": 65})):
        model, zopt = _setup(**kwargs)
        before = _snapshot(model, zopt)
        _case(res, name, lambda: checkpoint.load(ck, zopt, timeout=T))
        res[name]["unchanged"] = _same(_snapshot(model, zopt), before)
        zopt.close()

    # --- 3. a stalled peer costs `timeout`, not the process group's 30 minutes
    # (last: the failed calls leave nothing to resynchronise but the barrier)
    model, zopt = _setup(bf16=False)
    if rank == 1:
        time.sleep(3)  # stalled: arrives after rank 0 gave up
    _case(res, "stalled_peer", lambda: checkpoint.save(os.path.join(root, "stalled"), zopt, timeout=2))
    return res


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[str, list[dict[str, Any]]]:
    root = str(tmp_path_factory.mktemp("safety"))
    return root, run_ranks(_job_cases, 2, root, timeout=150)


def _refused_everywhere(res: list[dict[str, Any]], case: str, *words: str) -> str:
    """Every rank raised the same RuntimeError (CheckpointError), naming `words`."""
    outs = [r[case] for r in res]
    assert all("error" in o for o in outs), outs
    assert {o["type"] for o in outs} == {"CheckpointError"} and all(o["runtime"] for o in outs), outs
    assert len({o["error"] for o in outs}) == 1, f"ranks raised different errors: {outs}"
    msg = outs[0]["error"]
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def _beside(root: str, name: str) -> list[str]:
    return sorted(e for e in os.listdir(root) if e.startswith(f".{name}.") or e == f"{name}.old")


# ----------------------------------------------------------------------- tests


def test_existing_user_directory_survives(cases):
    root, res = cases
    _refused_everywhere(res, "user_dir", os.path.join(root, "outputs"), "not a zerocomm checkpoint")
    with open(os.path.join(root, "outputs", "train.log")) as f:
        assert f.read() == "log"
    with open(os.path.join(root, "outputs", "runs", "best_model.pt")) as f:
        assert f.read() == "weights"
    assert _beside(root, "outputs") == []


def test_regular_file_at_path_survives(cases):
    root, res = cases
    _refused_everywhere(res, "user_file", os.path.join(root, "model.bin"))
    with open(os.path.join(root, "model.bin")) as f:
        assert f.read() == "user data"
    assert _beside(root, "model.bin") == []


def test_trailing_slash(cases):
    root, res = cases
    assert [r["trailing_slash"] for r in res] == [{"ok": 5, "seconds": r["trailing_slash"]["seconds"]} for r in res]
    assert sorted(os.listdir(os.path.join(root, "slash"))) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "zerocomm.json",
        "zerocomm.pt",
    ]
    assert _beside(root, "slash") == []


def test_unwritable_parent_fails_on_every_rank_in_time(cases):
    root, res = cases
    for case in ("parent_is_file", "read_only_parent"):
        if case in res[0]:
            _refused_everywhere(res, case, "rank 0")
            assert all(r[case]["seconds"] < T for r in res)


def test_extra_round_trips_empty_containers(cases):
    _, res = cases
    assert all(r["extra_load"]["ok"] is True for r in res), [r["extra_load"] for r in res]
    assert res[0]["extra_consolidate"]["ok"] is True


def test_no_code_runs_from_a_file(cases):
    _, res = cases
    _refused_everywhere(res, "payload_in_extra", "plain data")
    _refused_everywhere(res, "payload_in_entries", "zerocomm.pt")
    _refused_everywhere(res, "payload_in_metadata", ".metadata", "_run_side_effect", "trusted=True")
    assert "error" in res[0]["payload_in_entries_consolidate"]
    assert "error" in res[0]["payload_in_metadata_consolidate"]
    for case in ("payload_in_extra", "payload_in_entries", "payload_in_metadata"):
        assert not any(r[case]["sentinel"] for r in res), f"{case}: code from the file ran"
    # with trusted=True the user opts in: the (genuine) metadata loads
    assert all(r["metadata_trusted"].get("ok") == 8 and r["metadata_trusted"]["sentinel"] for r in res)


def test_flipped_byte_is_detected_and_changes_nothing(cases):
    _, res = cases
    _refused_everywhere(res, "flipped_byte", "__1_0.distcp", "corrupt")
    assert "__1_0.distcp" in res[0]["flipped_byte_consolidate"]["error"]
    assert all(r["flipped_byte"]["unchanged"] for r in res)


def test_failed_read_is_a_runtime_error_and_changes_nothing(cases):
    _, res = cases
    msg = _refused_everywhere(res, "truncated")
    assert "CheckpointException ranks" not in msg.splitlines()[0], msg  # the underlying error, not DCP's wrapper
    assert all(r["truncated"]["unchanged"] for r in res), "a failed load changed parameters, masters or state"


@pytest.mark.parametrize(
    "case,words",
    [
        ("sgd", ("AdamW", "SGD")),
        ("fewer_layers", ("blocks.1.",)),
        ("shape", ("wte.weight", "(64, 16)", "(65, 16)")),
    ],
)
def test_wrong_model_or_optimizer_is_refused_and_changes_nothing(cases, case, words):
    _, res = cases
    _refused_everywhere(res, case, *words)
    assert all(r[case]["unchanged"] for r in res)


def _job_concurrent(rank: int, world: int, path: str, job: int, rounds: int, gate: str) -> dict[str, Any]:
    """One of two jobs saving to the same path: each round sets every
    parameter to the round's step number, so a mix of two saves shows."""
    from zerocomm import checkpoint

    model, zopt = _setup(bf16=False)
    if rank == 0:
        open(f"{gate}.{job}", "w").close()
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{gate}.{j}") for j in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.02)  # start together, so that the saves overlap
    dist.barrier()
    outcomes, seen = [], []
    for r in range(rounds):
        v = 100 * (job + 1) + r
        zopt.synchronize()  # the rule: the last step's sync lands before parameters are written
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(v))
        zopt.refresh_masters()
        try:
            checkpoint.save(path, zopt, step=v, timeout=T)
            outcomes.append((v, "ok"))
        except RuntimeError as e:
            outcomes.append((v, f"{type(e).__name__}: {e}"))
        if rank == 0:  # a reader racing the other job's save: one whole checkpoint, or an error
            try:
                full = checkpoint.consolidate(path, f"{gate}.{job}.pt")
                seen.append((full["step"], sorted({float(t.float().mean()) for t in full["model"].values()})))
            except Exception:
                pass
    return {"outcomes": outcomes, "seen": seen}


def test_concurrent_saves_never_mix(tmp_path):
    """Two 2-rank jobs save to one path, 4 rounds each."""
    from zerocomm.checkpoint import consolidate

    path, rounds = str(tmp_path / "ck"), 4
    results: dict[int, list] = {}
    threads = [
        threading.Thread(
            target=lambda j=j: results.__setitem__(
                j, run_ranks(_job_concurrent, 2, path, j, rounds, str(tmp_path / "gate"), timeout=120)
            )
        )
        for j in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.keys() == {0, 1}, "a job failed (see the thread's traceback)"
    ok = set()
    for j, per_rank in results.items():
        assert per_rank[0]["outcomes"] == per_rank[1]["outcomes"], "ranks of one job disagree"
        ok |= {v for v, o in per_rank[0]["outcomes"] if o == "ok"}
        for step, values in per_rank[0]["seen"]:
            assert values == [float(step)], f"job {j} read a mixed checkpoint: step {step}, values {values}"
    errors = [o for r in results.values() for _, o in r[0]["outcomes"] if o != "ok"]
    print(f"{len(ok)} saves succeeded, {len(errors)} refused: {errors[:2]}")
    assert ok, "no save succeeded"
    full = consolidate(path, tmp_path / "final.pt")
    assert full["step"] in ok
    assert {float(t.mean()) for t in full["model"].values()} == {float(full["step"])}
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".ck.")], "temp or lock left behind"


def test_stalled_peer_fails_save_within_timeout(cases):
    _, res = cases
    for r in res:
        assert r["stalled_peer"]["type"] == "CheckpointError", r["stalled_peer"]
    # rank 0 waits for the stalled peer no longer than the timeout (plus
    # set-up); rank 1, late, finds nobody (gloo may retry its connect a while)
    assert res[0]["stalled_peer"]["seconds"] < 8, res[0]["stalled_peer"]
    assert res[1]["stalled_peer"]["seconds"] < 20, res[1]["stalled_peer"]


def test_lock_of_a_dead_process_is_broken_a_live_one_is_not(tmp_path):
    """The save lock (no ranks needed): a lock left by a dead process on this
    host is taken over; one held by a live process, or by another host,
    makes the save fail naming the lock file; release never removes a lock
    that is not its own."""
    import socket
    import subprocess
    import sys

    from zerocomm import _ckpt_fs as fs

    paths = fs.normalise(tmp_path / "ck")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    for holder, takes_over in ((int(dead.stdout), True), (os.getpid(), False)):
        with open(paths.lock, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": holder, "token": "x" * 32}, f)
        if takes_over:
            lock = fs.acquire(paths, "a" * 32)
            assert lock.owned()
            lock.release()
            assert not os.path.exists(paths.lock)
        else:
            with pytest.raises(fs.CheckpointError, match="in progress.*lock file"):
                fs.acquire(paths, "b" * 32)
            assert fs.read_json(paths.lock)["token"] == "x" * 32  # untouched
    with open(paths.lock, "w") as f:
        json.dump({"host": "elsewhere", "pid": int(dead.stdout), "token": "y" * 32}, f)
    with pytest.raises(fs.CheckpointError, match="elsewhere"):
        fs.acquire(paths, "c" * 32)
    fs.Lock(paths.lock, "c" * 32).release()  # not its lock: stays
    assert os.path.exists(paths.lock)
