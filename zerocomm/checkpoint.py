"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP):
`save`, `load` (any world size, either mode) and `consolidate`.

What is in a checkpoint: `_ckpt_state` (the state dict) and `_ckpt_fs`
(the files, the marker, the lock). The guarantees, each kept on every rank:

- nothing zerocomm did not write is moved or removed: a path that exists and
  is not a zerocomm checkpoint is refused;
- a save writes to its own temp directory under a lock, checks that every
  rank's files are there, and only then replaces the previous checkpoint, so
  concurrent saves end with one complete checkpoint or an error;
- after every step the ranks share their verdicts: all raise the same
  `CheckpointError` (a RuntimeError) or all succeed, within `timeout`;
- loading runs no code from the files (`trusted=True` opts into DCP's
  pickled `.metadata` as is), checks every file's sha256, and checks the
  model and optimizer before writing anything into them.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from . import _ckpt_fs as fs
from ._ckpt_coord import DEFAULT_TIMEOUT_S, Coordinator, as_exception, coordination
from ._ckpt_fs import OLD_SUFFIX, CheckpointError, Paths
from ._ckpt_keys import Keys, report, resolve, saved_groups, view
from ._ckpt_read import (
    Opened,
    SafeEmptyLoadPlanner,
    SafeLoadPlanner,
    SafeReader,
    check_unchanged,
    open_checkpoint,
)
from ._ckpt_state import (
    EXTRA,
    FORMAT,
    GROUPS,
    MASTER,
    META,
    MODEL,
    STEP,
    by_param,
    check_compatible,
    dcp_group,
    load_sharded_state_dict,
    sharded_state_dict,
)
from .blocks import chunk_prefix

if TYPE_CHECKING:
    from .shards import ShardedOptimizer

__all__ = [
    "save",
    "load",
    "consolidate",
    "Loaded",
    "CheckpointError",
    "DEFAULT_TIMEOUT_S",
    "OLD_SUFFIX",
    "sharded_state_dict",
    "load_sharded_state_dict",
    "FORMAT",
    "META",
    "STEP",
    "EXTRA",
    "GROUPS",
]


class Loaded(NamedTuple):
    """What `load()` returns besides restoring the model and optimizer."""

    step: Any
    extra: Any


def save(
    path: str | os.PathLike,
    zopt: "ShardedOptimizer",
    *,
    step: Any = None,
    extra: Any = None,
    timeout: float | None = None,
) -> None:
    """Write a sharded checkpoint of the model and optimizer to directory
    `path` (collective: every rank calls it; `path` on a shared filesystem).

    `step` and `extra` (rank 0's are saved) come back from `load()`; they
    must be plain data: dicts, lists, tuples, tensors, numbers, strings,
    None (e.g. an LR scheduler's state_dict). `path` must not exist or be a
    zerocomm checkpoint, which is then replaced once the new one is complete.
    `timeout`: seconds any rank waits for the others at any step (default
    `DEFAULT_TIMEOUT_S`; raise it for very large checkpoints on slow storage).
    Raises `CheckpointError` on every rank if any rank failed."""
    group = dcp_group(zopt)
    with coordination(group, timeout, f"zerocomm.checkpoint.save({os.fspath(path)!r})") as co:
        _save(path, zopt, co, step, extra)


def _keys(zopt: "ShardedOptimizer", co: Coordinator, *, saving: bool) -> Keys:
    """This rank's checkpoint keys, the expert groups shared over `co`
    (nothing to share without an expert plan: the same on every rank)."""
    err: BaseException | None = None
    mine = None
    try:
        mine = report(zopt, compare_unplanned=saving)
    except Exception as e:
        err = e
    co.agree(err, "describing the expert groups")
    if mine is None:
        return Keys()
    keys = Keys()
    everyone = co.all_gather(mine, "sharing the expert groups")
    try:
        keys = resolve(zopt, everyone)
    except Exception as e:
        err = e
    co.agree(err, "checking the expert groups")
    return keys


def _save(path: str | os.PathLike, zopt: "ShardedOptimizer", co: Coordinator, step: Any, extra: Any) -> None:
    err: BaseException | None = None
    sd: dict[str, Any] = {}
    blob = b""
    paths: Paths | None = None
    keys = _keys(zopt, co, saving=True)
    try:
        paths = fs.normalise(path)
        sd = sharded_state_dict(zopt, keys=keys)
        entries = {"meta": sd.pop(META), "param_groups": sd.pop(GROUPS), "step": step, "extra": extra}
        blob = fs.entries_bytes(entries)
    except Exception as e:
        err = e
    co.agree(err, "collecting the state to save")
    assert paths is not None
    token: str | None = uuid.uuid4().hex if co.rank == 0 else None
    lock: fs.Lock | None = None
    tmp: str | None = None
    try:
        if co.rank == 0:
            assert token is not None
            lock, tmp = fs.begin_save(paths, token)
    except Exception as e:
        err = e
    try:
        co.agree(err, "preparing the directory")
        token = co.from_rank0(token, "sharing the save's name")
        tmp = paths.temp(token)
        mine: dict[str, str] = {}
        try:
            if not os.path.isdir(tmp):
                raise FileNotFoundError(
                    f"rank 0 made {tmp}, but this rank does not see it: every rank "
                    f"must see the same (shared) filesystem at {paths.parent}"
                )
            if co.rank == 0:
                with open(os.path.join(tmp, fs.ENTRIES), "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
            dcp.save(
                sd,
                storage_writer=dcp.FileSystemWriter(tmp),
                process_group=co.group,
                planner=DefaultSavePlanner(flatten_state_dict=False),
                no_dist=co.world == 1,
            )
            for file in glob.glob(os.path.join(glob.escape(tmp), f"__{co.rank}_*.distcp")):
                mine[os.path.basename(file)] = fs.sha256(file)
        except BaseException as e:
            err = as_exception(e)
        co.agree(err, "writing")
        digests = {
            name: h for ranks_files in co.all_gather(mine, "collecting checksums") for name, h in ranks_files.items()
        }
        try:
            if co.rank == 0:
                assert lock is not None
                metadata = SafeReader(tmp, trusted=False).read_metadata()
                needed = {info.relative_path for info in metadata.storage_data.values()}
                fs.finish_save(paths, tmp, lock, digests, token, needed)
        except Exception as e:
            err = e
        co.agree(err, "moving the checkpoint into place")
    finally:
        if co.rank == 0 and lock is not None:
            if tmp is not None and os.path.lexists(tmp):  # this save's own temp: it failed
                shutil.rmtree(tmp, ignore_errors=True)
            lock.release()


def load(
    path: str | os.PathLike, zopt: "ShardedOptimizer", *, timeout: float | None = None, trusted: bool = False
) -> Loaded:
    """Restore model parameters, optimizer state and hyper-parameters from a
    checkpoint written by `save()` on any world size and in either mode
    (collective). Returns `(step, extra)` as given to `save()`.

    Runs no code from the files unless `trusted=True` (then DCP's pickled
    `.metadata` is unpickled as is). Every file's checksum, the optimizer
    class and the model's names, shapes and dtypes are checked before
    anything is written: a load that raises leaves model, masters and
    optimizer state as they were. Raises `CheckpointError` on every rank."""
    group = dcp_group(zopt)
    with coordination(group, timeout, f"zerocomm.checkpoint.load({os.fspath(path)!r})") as co:
        err: BaseException | None = None
        opened: Opened | None = None
        sd: dict[str, Any] = {}
        keys = _keys(zopt, co, saving=False)
        try:
            opened = open_checkpoint(fs.resolve(fs.normalise(path)), trusted)
            data = sorted(f for f in opened.marker["files"] if f not in (fs.ENTRIES, fs.METADATA))
            fs.verify(opened.path, opened.marker, data[co.rank :: co.world])  # each rank a share
            meta, groups = opened.entries.get("meta"), opened.entries.get("param_groups")
            check_compatible(zopt, meta, groups, opened.metadata, keys)
            sd = sharded_state_dict(zopt, metadata=opened.metadata, keys=keys)
        except Exception as e:
            err = e
        co.agree(err, "checking the checkpoint")
        assert opened is not None
        try:
            dcp.load(
                sd,
                storage_reader=SafeReader(opened.path, trusted=trusted),
                process_group=co.group,
                planner=SafeLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                no_dist=co.world == 1,
            )
            check_unchanged(opened)
        except BaseException as e:
            err = as_exception(e)
        co.agree(err, "reading the checkpoint")
        try:
            sd[META], sd[GROUPS] = opened.entries["meta"], opened.entries["param_groups"]
            load_sharded_state_dict(zopt, sd)
        except Exception as e:
            err = e
        co.agree(err, "applying the checkpoint")
    return Loaded(opened.entries.get("step"), opened.entries.get("extra"))


def consolidate(
    path: str | os.PathLike, out_file: str | os.PathLike, *, trusted: bool = False, expert_group: int | None = None
) -> dict[str, Any]:
    """Turn the sharded checkpoint at `path` into one `torch.save` file (one
    process, no process group needed):

        {"model": model state_dict (a list of them for several chunks),
         "optimizer": state_dict in the unsharded torch optimizer's format,
         "step": ..., "extra": ..., "master": {param name: fp32 master} if any}

    A checkpoint of expert sub-groups holds one set of experts per expert
    group: `expert_group=g` picks the model (and optimizer state) as the
    ranks of the g-th expert group (by lowest rank) hold it.

    Returns the same dict. Checks every file's checksum and runs no code from
    the files unless `trusted=True` (see `load`)."""
    paths = fs.normalise(path)
    opened = open_checkpoint(fs.resolve(paths), trusted)
    fs.verify(opened.path, opened.marker, sorted(opened.marker["files"]))
    sd: dict[str, Any] = {}
    # What dcp_to_torch_save does: the planner builds every key from the
    # metadata, assembling each tensor from all saved chunks (dcp.load would
    # only fill the keys `sd` already has).
    try:
        _load_state_dict(
            sd,
            storage_reader=SafeReader(opened.path, trusted=trusted),
            planner=SafeEmptyLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
            no_dist=True,
        )
    except CheckpointException as e:
        raise as_exception(e) from e
    check_unchanged(opened)
    meta = opened.entries.get("meta")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a zerocomm checkpoint (meta format {FORMAT})")
    sd = view(sd, _expert_group(path, saved_groups(sd), expert_group))
    whole = {k[len(MODEL) :]: v for k, v in sd.items() if k.startswith(MODEL)}
    model: dict[str, Any] | list[dict[str, Any]] = whole
    saved = by_param(sd)
    state: dict[int, dict[str, Any]] = {}
    groups, idx = [], 0
    for hyper, names in zip(opened.entries["param_groups"], meta["param_names"]):
        groups.append({**hyper, "params": list(range(idx, idx + len(names)))})
        for name in names:
            shape = model[name].shape  # element-wise state was saved flattened
            entry = {
                k: v.view(shape) if torch.is_tensor(v) and tuple(v.shape) == (shape.numel(),) else v
                for k, v in saved.get(name, {}).items()
            }
            if entry:
                state[idx] = entry
            idx += 1
    n = meta.get("n_chunks", 1)
    if n > 1:
        prefixes = [chunk_prefix(c, n) for c in range(n)]
        model = [{k[len(pre) :]: v for k, v in whole.items() if k.startswith(pre)} for pre in prefixes]
    out: dict[str, Any] = {
        "model": model,
        "optimizer": {"state": state, "param_groups": groups},
        "step": opened.entries.get("step"),
        "extra": opened.entries.get("extra"),
    }
    masters = {k[len(MASTER) :]: v for k, v in sd.items() if k.startswith(MASTER)}
    if masters:
        out["master"] = masters
    torch.save(out, os.fspath(out_file))
    return out


def _expert_group(path: str | os.PathLike, saved: int, expert_group: int | None) -> int | None:
    """Which expert group's entries `consolidate` takes (None: no groups)."""
    if saved == 1 and expert_group in (None, 0):
        return None
    if expert_group is None:
        raise ValueError(
            f"{path} holds the experts of {saved} expert groups: pass expert_group=g "
            f"(0..{saved - 1}, the g-th by lowest rank) for the model one group's ranks hold"
        )
    if isinstance(expert_group, bool) or not isinstance(expert_group, int) or not 0 <= expert_group < saved:
        raise ValueError(f"expert_group must be an int in 0..{saved - 1} for {path}, got {expert_group!r}")
    return expert_group
