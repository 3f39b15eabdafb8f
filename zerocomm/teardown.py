"""Tearing a handle down in an order that cannot hang or crash: after a
failure (drain the comm worker), per unit (close the scheduler, its stream
and communicator, without the GIL), and at interpreter exit (close what the
user left open). Kept out of the runtime's main path."""

from __future__ import annotations

import atexit
import weakref
from typing import Any, cast

from .sync_unit import SyncUnit

# Handles still open at interpreter exit are closed first: a comm worker
# thread left running into C++ static destruction aborts the process.
_OPEN_HANDLES: "weakref.WeakSet[Any]" = weakref.WeakSet()  # ParamSync handles


@atexit.register
def _close_open_handles() -> None:
    for handle in list(_OPEN_HANDLES):
        try:
            handle.close()  # joins the comm worker and the watchdog thread
        except Exception:  # one handle's failure must not leave the others open
            pass


def register_open(handle: Any) -> None:
    """`handle.close()` runs at interpreter exit unless the user closed it."""
    _OPEN_HANDLES.add(handle)


class _Closed:
    """Stands in for the scheduler of a closed handle (the sharded optimizer
    keeps its SyncUnits): any use raises instead of touching freed state."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError("this zerocomm handle is closed")


def drain(u: SyncUnit, attempts: int = 3) -> None:
    """After a failure, wait (GIL released) until the comm worker has left
    the collective it may still be blocked in. After abort() the waits it
    can be in end at once (c10d works, simulated hold, debug delay) -- except
    gloo's reduce-scatter, which runs inside Work::wait and ends at the
    private backend's timeout -- so this normally returns at the first
    attempt; each attempt is bounded by the timeout, and the worker,
    poisoned, skips what follows."""
    for _ in range(attempts):
        try:
            u.sched.host_synchronize()
            return
        except Exception as e:
            if "timed out" not in str(e):
                return  # the worker reached the poisoned event: it is idle


def release(u: SyncUnit) -> None:
    """Tear the unit's native side down now: `sched.close()` stops the
    watchdog, joins the comm worker and frees the communicator's transport
    (gloo: joins the private backend's threads), with the GIL released
    ([Note: native teardown without the GIL] in csrc/bindings.cpp).

    Explicit, not left to the scheduler's destructor: a traceback's frames
    (the forward hook that raised holds it), a tracer or a user's variable
    may keep the Python object alive past close(), and its destructor would
    then run whenever the last of them goes -- possibly while a gloo thread
    still needs the GIL to release a finished work's tensors, or at
    interpreter exit, when such a thread is ended inside a noexcept
    destructor and the process aborts."""
    sched = u.sched
    u.sched = cast(Any, _Closed())
    sched.close()
    u.transport.stream = cast(Any, None)
    u.transport.comm = cast(Any, None)
    u.transport.replica = None
