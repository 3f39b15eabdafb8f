"""Ranks that took different paths ([Note: diverged ranks] in docs/design.md).

Every rank must run the same sequence of zerocomm calls: a rank that skips
`step()` on a condition only it saw (a gradient spike decided from its
rank-local `p.grad`) pairs its next collectives with its peers' previous
ones, and without a check both ranks wait for each other until the timeout
(30 minutes by default) with errors that do not name the cause. As
ProcessGroupNCCL's desync debug carries sequence numbers, every step's
gradient-presence vote (one collective per step, already there) carries
each rank's `Position`: how many steps reached the vote and how many
backward passes handed gradients to the reduction. Unequal positions raise
on every rank at that vote, naming each rank's position: as soon as the
ranks' paths meet again, one iteration after they parted.

A rank that stops voting altogether (it skipped the last step, or raised
and left) cannot answer: each rank posts its final position to the store
when its handle closes, and a rank waiting in a vote that the closed peer
never reached raises naming it instead of waiting for the timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

_POLL_S = 0.25  # how often a waiting vote reads its peers' posts


@dataclass
class Position:
    """Where this rank is in the sequence of zerocomm's per-step calls."""

    steps: int = 0  # step() calls that reached the gradient exchange
    backwards: int = 0  # backward passes that handed gradients to the reduction
    _open: bool = False  # this step's reduction has started

    def reduction_started(self) -> None:
        if not self._open:
            self._open = True
            self.backwards += 1

    def step_reset(self) -> None:
        """zero_grad() or the end of step(): the next reduction is a new pass."""
        self._open = False

    def describe(self) -> str:
        return f"step() #{self.steps} after {self.backwards} backward pass(es) with gradient reduction"


HINT = (
    "Every rank must call backward(), step() and zero_grad() in the same sequence. A rank that "
    "skips step() (or runs an extra backward) on a condition only it sees, e.g. a gradient spike "
    "read from p.grad, which holds the rank-local gradient, diverges: decide on zopt.grad_norm() "
    "(the global norm, the same on every rank) or agree with an all_reduce first"
)


def encode_into(out: Any, flags: list[bool], pos: Position, rank: int) -> None:
    """The vote, written into `out` (the host array of a reused int64 tensor,
    so no torch op runs per step): the presence flags (OR by sum), then each
    rank's position in its own slots (zeros elsewhere: the sum gathers them)."""
    out[:] = 0
    out[: len(flags)] = flags
    out[len(flags) + 2 * rank] = pos.steps
    out[len(flags) + 2 * rank + 1] = pos.backwards


def decode(t: torch.Tensor, n_flags: int, world: int) -> tuple[list[bool], list[Position]]:
    values = t.tolist()  # read without a torch op
    counts = values[n_flags:]
    flags = [v > 0 for v in values[:n_flags]]
    return flags, [Position(steps=counts[2 * r], backwards=counts[2 * r + 1]) for r in range(world)]


class Diverged(RuntimeError):
    """The ranks ran different sequences of zerocomm calls."""


def check(positions: list[Position], board: "Board | None") -> None:
    """Raise (on every rank alike: all hold the same positions) when ranks
    differ; posted, so that a peer stuck behind the divergence (in a
    reduction nobody else joins) reports the cause when its wait fails."""
    first = positions[0]
    if all(p.steps == first.steps and p.backwards == first.backwards for p in positions):
        return
    where = "; ".join(f"rank {r} at its {p.describe()}" for r, p in enumerate(positions))
    msg = f"zerocomm: the ranks took different paths: {where}. {HINT}"
    if board is not None:
        board.post("diverged", msg)
    raise Diverged(msg)


class Board:
    """Final positions of closed handles, posted to the process group's
    store under the handle's own prefix (host-side, read without blocking)."""

    def __init__(self, store: Any, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world

    def post(self, kind: str, text: str) -> None:
        try:
            self.store.set(f"{kind}/{self.rank}", text)
        except Exception:  # the store may be gone at interpreter exit
            pass

    def post_closed(self, pos: Position) -> None:
        self.post("closed", f"{pos.steps},{pos.backwards}")

    def diverged(self) -> str | None:
        """A divergence a peer detected and posted, if any."""
        for r in range(self.world):
            key = f"diverged/{r}"
            if r != self.rank and self.store.check([key]):
                return f"{self.store.get(key).decode()} (detected by rank {r})"
        return None

    def closed_before(self, steps: int) -> list[tuple[int, Position]]:
        """Peers whose handle closed before reaching vote number `steps`."""
        out = []
        for r in range(self.world):
            key = f"closed/{r}"
            if r == self.rank or not self.store.check([key]):
                continue
            s, b = (int(x) for x in self.store.get(key).decode().split(","))
            if s < steps:
                out.append((r, Position(steps=s, backwards=b)))
        return out


def _closed_peers(board: Board, pos: Position) -> None:
    gone = board.closed_before(pos.steps)
    if gone:
        where = "; ".join(f"rank {r} closed its zerocomm handle at its {p.describe()}" for r, p in gone)
        raise Diverged(
            f"zerocomm: the ranks took different paths: rank {board.rank} waits at its {pos.describe()}; "
            f"{where}. {HINT}"
        )


def wait_vote(work: Any, board: Board, pos: Position) -> None:
    """Wait for the vote; raise naming the peer when one closed before it
    (while waiting, or when its leaving broke the vote)."""
    delay, next_check = 5e-5, time.monotonic() + _POLL_S
    try:
        while not work.is_completed():
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + _POLL_S
                _closed_peers(board, pos)
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)  # overshoot past completion stays under 1 ms
        work.wait()  # completed: raises the collective's error, if any
    except Diverged:
        raise
    except Exception:
        _closed_peers(board, pos)
        raise


def explain(error: Exception, boards: list[Board | None]) -> None:
    """A wait that failed (timed out, or a peer left) behind a divergence a
    peer detected: raise that divergence instead, from the failure."""
    for board in boards:
        try:
            found = board.diverged() if board is not None else None
        except Exception:  # the store is gone too
            found = None
        if found is not None:
            raise Diverged(f"{found}; on this rank: {error}") from error
