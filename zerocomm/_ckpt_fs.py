"""Files and locks behind `zerocomm.checkpoint`.

Layout of a checkpoint directory written by zerocomm:

    .metadata, __<rank>_<i>.distcp   torch.distributed.checkpoint's own files (tensors)
    zerocomm.pt                      meta, step, extra, param groups: plain data
                                     (torch.save, read back with weights_only=True)
    zerocomm.json                    marker, written last: format, save token and the
                                     sha256 of every other file

Only a directory holding that marker is treated as zerocomm's: anything else at
a checkpoint path is refused, never moved or removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

FORMAT = 2
KIND = "zerocomm-checkpoint"
MARKER, ENTRIES, METADATA = "zerocomm.json", "zerocomm.pt", ".metadata"
SAVING_MARK = "zerocomm-saving.json"  # in a save's temp directory from its creation on
OLD_SUFFIX = ".old"


class CheckpointError(RuntimeError):
    """A checkpoint operation failed; raised on every rank with the same message."""


def short_weights_only_error(e: Exception) -> str:
    """torch.load(weights_only=True)'s refusal is a page of advice; the line
    naming the refused global is what matters here."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    return next(
        (ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler error" in ln),
        lines[0] if lines else type(e).__name__,
    )


# ------------------------------------------------------------------ paths


@dataclass(frozen=True)
class Paths:
    target: str  # absolute, no trailing slash: temp and lock stay beside it, not inside
    parent: str
    name: str

    @property
    def lock(self) -> str:
        return os.path.join(self.parent, f".{self.name}.lock")

    @property
    def old(self) -> str:
        return self.target + OLD_SUFFIX

    def temp(self, token: str) -> str:
        return os.path.join(self.parent, f".{self.name}.saving-{token}")

    def is_temp(self, entry: str) -> bool:
        return re.fullmatch(rf"\.{re.escape(self.name)}\.saving-[0-9a-f]{{32}}", entry) is not None


def normalise(path: str | os.PathLike) -> Paths:
    raw = os.fspath(path)
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"checkpoint path must be a non-empty str or os.PathLike, got {path!r}")
    target = os.path.abspath(raw)  # also drops a trailing slash
    parent, name = os.path.split(target)
    if not name:
        raise ValueError(f"checkpoint path {raw!r} names the filesystem root: give a directory name")
    return Paths(target, parent, name)


def read_json(file: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_marker(directory: str) -> dict | None:
    marker = read_json(os.path.join(directory, MARKER))
    return marker if isinstance(marker, dict) and marker.get("kind") == KIND else None


def foreign(path: str) -> str | None:
    """Why `path` must not be touched (None: absent, or a zerocomm checkpoint)."""
    if os.path.islink(path):
        return f"{path} is a symbolic link, not a zerocomm checkpoint directory"
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return f"{path} exists and is not a directory (a zerocomm checkpoint is a directory)"
    if read_marker(path) is None:
        hint = (
            (
                " (it holds a .metadata: a checkpoint of torch.distributed.checkpoint or of zerocomm before "
                f"checkpoint format {FORMAT})"
            )
            if os.path.exists(os.path.join(path, METADATA))
            else ""
        )
        return (
            f"{path} exists and is not a zerocomm checkpoint (no {MARKER}){hint}; zerocomm never "
            "overwrites or removes what it did not write: choose another path or move it yourself"
        )
    return None


def resolve(paths: Paths) -> str:
    """The complete checkpoint at `paths`: a crash between the two renames of
    a save leaves it only under `<path>.old`."""
    if read_marker(paths.target) is not None:
        return paths.target
    if not os.path.lexists(paths.target) and read_marker(paths.old) is not None:
        return paths.old
    why = foreign(paths.target) if os.path.lexists(paths.target) else f"{paths.target} does not exist"
    raise FileNotFoundError(f"no complete zerocomm checkpoint at {paths.target}: {why}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(file: str) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------- lock


@dataclass
class Lock:
    """An O_CREAT|O_EXCL lock file beside the target, held by rank 0 for the
    whole save (works on NFS, unlike flock). It names its holder, so a lock
    left by a dead process on this host is recognised and broken."""

    path: str
    token: str

    def owned(self) -> bool:
        holder = read_json(self.path)
        return isinstance(holder, dict) and holder.get("token") == self.token

    def release(self) -> None:
        if self.owned():  # never remove another save's lock
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _stale(lock_path: str, holder: Any) -> bool:
    if not isinstance(holder, dict):  # unreadable: maybe being written right now
        try:
            return time.time() - os.stat(lock_path).st_mtime > 60
        except OSError:
            return False
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False  # another host's process: cannot tell whether it is alive
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _break(lock_path: str, holder: Any, token: str) -> None:
    """Remove a stale lock, unless it changed hands since it was judged stale."""
    aside = f"{lock_path}.stale-{token}"
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return
    if read_json(aside) != holder:  # took a fresh lock by mistake: put it back
        try:
            os.link(aside, lock_path)
        except FileExistsError:
            pass
    os.unlink(aside)


def acquire(paths: Paths, token: str) -> Lock:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "time": time.time()}
    for attempt in range(3):
        try:
            fd = os.open(paths.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except PermissionError as e:
            raise PermissionError(
                f"cannot write in {paths.parent} (for the lock file of {paths.target}): {e.strerror}"
            ) from None
        except FileExistsError:
            holder = read_json(paths.lock)
            if attempt < 2 and _stale(paths.lock, holder):
                _break(paths.lock, holder, token)
                continue
            who = (
                f"host {holder.get('host')}, pid {holder.get('pid')}" if isinstance(holder, dict) else "unknown holder"
            )
            raise CheckpointError(
                f"another save to {paths.target} is in progress (lock file {paths.lock}, {who}); "
                "wait for it to finish, or delete the lock file if no save is running"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        return Lock(paths.lock, token)
    raise CheckpointError(f"could not take the lock {paths.lock} for {paths.target}")


# ------------------------------------------------------------------- save


def begin_save(paths: Paths, token: str) -> tuple[Lock, str]:
    """Rank 0, before anyone writes: refuse foreign files, take the lock,
    tidy up after crashed saves (only what zerocomm wrote), make the temp."""
    for p in (paths.target, paths.old):
        why = foreign(p)
        if why is not None:
            raise FileExistsError(why)
    try:
        os.makedirs(paths.parent, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the directory {paths.parent} for the checkpoint: {e}") from None
    if not os.path.isdir(paths.parent):
        raise NotADirectoryError(f"the parent of the checkpoint path, {paths.parent}, is not a directory")
    lock = acquire(paths, token)
    try:
        if not os.path.lexists(paths.target) and read_marker(paths.old) is not None:
            os.rename(paths.old, paths.target)  # finish what a crash between the renames left
        elif os.path.lexists(paths.old):
            remove_checkpoint(paths.old)  # ours (checked above), a crash after both renames left it
        for entry in os.listdir(paths.parent):
            d = os.path.join(paths.parent, entry)
            if paths.is_temp(entry) and (os.path.exists(os.path.join(d, SAVING_MARK)) or read_marker(d) is not None):
                shutil.rmtree(d, ignore_errors=True)  # a crashed save's leftovers (we hold the lock)
        tmp = paths.temp(token)
        os.mkdir(tmp)
        with open(os.path.join(tmp, SAVING_MARK), "w", encoding="utf-8") as f:
            json.dump({"target": paths.target, "token": token}, f)
        return lock, tmp
    except BaseException:
        lock.release()
        raise


def entries_bytes(entries: dict[str, Any]) -> bytes:
    """zerocomm's own entries as a torch.save blob that weights_only=True can
    read; refuse (at save, not at load) what it could not."""
    buf = io.BytesIO()
    torch.save(entries, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as e:
        raise TypeError(
            "step and extra must be plain data (dicts, lists, tuples, tensors, numbers, strings, "
            f"None), so that load() can read them without running code from the file: "
            f"{short_weights_only_error(e)}"
        ) from None
    return buf.getvalue()


def remove_checkpoint(path: str) -> None:
    """Remove a checkpoint directory zerocomm wrote, its marker last: if this
    stops half-way, what is left is still recognised as zerocomm's."""
    for entry in os.listdir(path):
        if entry != MARKER:
            file = os.path.join(path, entry)
            if os.path.isdir(file) and not os.path.islink(file):
                shutil.rmtree(file)
            else:
                os.unlink(file)
    if os.path.lexists(os.path.join(path, MARKER)):
        os.unlink(os.path.join(path, MARKER))
    os.rmdir(path)


def replace_dir(tmp: str, target: str, old: str) -> None:
    """Put the finished `tmp` at `target`; until the second rename the
    previous checkpoint stays complete under `old` (found by `resolve`)."""
    if os.path.lexists(target):
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(os.path.dirname(target))
    if os.path.lexists(old):
        remove_checkpoint(old)


def finish_save(paths: Paths, tmp: str, lock: Lock, digests: dict[str, str], token: str, needed: set[str]) -> None:
    """Rank 0, after every rank wrote and hashed its files: check that `tmp`
    holds this save's complete output (`needed`: the data files its
    .metadata refers to), seal it with the marker, move it into place."""
    missing = sorted(f for f in needed | {METADATA, ENTRIES} if not os.path.isfile(os.path.join(tmp, f)))
    unhashed = sorted(needed - digests.keys())
    if missing or unhashed:
        raise CheckpointError(
            f"the save in {tmp} is incomplete: missing {missing}, not written by any rank of this save {unhashed}"
        )
    files = {**digests, METADATA: sha256(os.path.join(tmp, METADATA)), ENTRIES: sha256(os.path.join(tmp, ENTRIES))}
    marker = {"kind": KIND, "format": FORMAT, "token": token, "files": files}
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(os.path.join(tmp, SAVING_MARK))
    fsync_dir(tmp)
    if not lock.owned():
        raise CheckpointError(
            f"lost the lock {paths.lock} during the save (deleted by hand?): {paths.target} left unchanged"
        )
    why = foreign(paths.target)
    if why is not None:
        raise FileExistsError(why)
    replace_dir(tmp, paths.target, paths.old)


# ------------------------------------------------------------------- load


def verify(path: str, marker: dict, files: list[str]) -> None:
    for name in files:
        want = marker["files"].get(name)
        file = os.path.join(path, name)
        if want is None or os.path.basename(name) != name:
            raise CheckpointError(f"{file} is not listed in {MARKER}")
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing")
        if sha256(file) != want:
            raise CheckpointError(f"{file} is corrupt: its sha256 differs from the one recorded at save")
