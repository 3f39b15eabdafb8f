"""How the ranks of one checkpoint call stay together: a gloo group of the
call's own, created with its `timeout`, over which every rank shares its
verdict after each step. So all ranks raise the same error or all succeed,
and a stalled peer costs `timeout`, not the training group's 30 minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ._ckpt_fs import CheckpointError

DEFAULT_TIMEOUT_S = 600.0


def describe(e: BaseException) -> str:
    """One line for an error, DCP's CheckpointException reduced to its first
    underlying error (its own text is only 'CheckpointException ranks:...')."""
    if isinstance(e, CheckpointException):
        for rank, failure in sorted(e.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            return f"rank {rank}: {type(inner).__name__}: {str(inner) or '(no message; a damaged file?)'}"
    if isinstance(e, CheckpointError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def as_exception(e: BaseException) -> Exception:
    """DCP's CheckpointException is a BaseException that `except Exception`
    misses: turn it into a RuntimeError carrying the first underlying error."""
    if isinstance(e, CheckpointException):
        err = CheckpointError(f"torch.distributed.checkpoint failed on {describe(e)}")
        err.__cause__ = e
        return err
    if isinstance(e, Exception):
        return e
    raise e  # KeyboardInterrupt, SystemExit: not ours to convert


@dataclass
class Coordinator:
    """One checkpoint call's ranks and their own gloo group."""

    group: dist.ProcessGroup | None  # None: a single rank, nothing to coordinate
    rank: int
    world: int
    timeout: float
    what: str

    def _collective_failed(self, step: str, e: BaseException) -> CheckpointError:
        return CheckpointError(
            f"{self.what}: {step}: lost a peer (it crashed, stalled for more than "
            f"timeout={self.timeout:g} s, or did not make this call): {describe(e)}"
        )

    def agree(self, error: BaseException | None, step: str) -> None:
        mine = None if error is None else describe(error)
        if self.world == 1:
            verdicts = [mine]
        else:
            verdicts = [None] * self.world
            try:
                dist.all_gather_object(verdicts, mine, group=self.group)
            except Exception as e:
                raise self._collective_failed(step, e) from (error or e)
        by_message: dict[str, list[int]] = {}
        for r, v in enumerate(verdicts):
            if v is not None:
                by_message.setdefault(v, []).append(r)
        if by_message:
            msg = "; ".join(
                f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {v}" for v, rs in by_message.items()
            )
            raise CheckpointError(f"{self.what} failed while {step} ({msg})") from error

    def all_gather(self, value: Any, step: str) -> list[Any]:
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, value, group=self.group)
        except Exception as e:
            raise self._collective_failed(step, e) from e
        return out

    def from_rank0(self, value: Any, step: str) -> Any:
        return self.all_gather(value, step)[0]


def _check_timeout(timeout: float | None) -> float:
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds (or None), got {timeout!r}")
    return float(timeout)


@contextmanager
def coordination(group: dist.ProcessGroup | None, timeout: float | None, what: str) -> Iterator[Coordinator]:
    seconds = _check_timeout(timeout)  # same argument on every rank: raises on all or none
    if group is None or dist.get_world_size(group) == 1:
        yield Coordinator(None, 0, 1, seconds, what)
        return
    # Created by every member, first thing in the call, so the groups'
    # names (a per-process counter) stay in step across ranks. Over the whole
    # world every rank is a member, so the counter-named form is used there:
    # torch < 2.14 names every local-synchronization group over the same
    # ranks alike (no counter), and a second checkpoint call then meets the
    # first one's stale rendezvous keys in the store (torch 2.11: a hang).
    ranks = dist.get_process_group_ranks(group)
    try:
        own = dist.new_group(
            ranks=ranks,
            backend="gloo",
            timeout=timedelta(seconds=seconds),
            use_local_synchronization=len(ranks) != dist.get_world_size(),
        )
    except Exception as e:
        raise CheckpointError(f"{what}: could not set up its process group within {seconds:g} s: {describe(e)}") from e
    try:
        pg = cast(dist.ProcessGroup, own)
        yield Coordinator(pg, dist.get_rank(pg), dist.get_world_size(pg), seconds, what)
    finally:
        try:
            dist.destroy_process_group(own)
        except Exception:
            pass  # already broken by a failed peer; nothing left to release
