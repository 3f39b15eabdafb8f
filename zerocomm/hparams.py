"""The hyper-parameters of the optimizer passed to `attach` and of the
sharded optimizer's local one stay the same ([Note: two optimizers' param
groups] in docs/design.md).

Users change hyper-parameters on whichever object they hold: an LR
scheduler built on the torch optimizer before attach (its warm-up has set
`lr` to 0 there), one built on it after attach, one built on the
`ZeroOptimizer`, or a plain `opt.param_groups[0]["lr"] = x`. `sync()` runs
at every `step()` and whenever `ZeroOptimizer.param_groups` is read: an
option that changed on one side since the last sync is copied to the other,
so both always show the same values and the shards step with them. An
option changed on both sides to different values since the last sync is
ambiguous: `sync()` raises, naming the group and the key.
"""

from __future__ import annotations

from typing import Any

import torch

_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # values that do not compare (arrays): changed
        return False


def _snapshot(group: dict) -> dict:
    """The options of a param group, tensors copied (schedulers may update a
    tensor lr in place)."""
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in group.items() if k != "params"}


class HyperParams:
    """Keeps the user's optimizer's param groups and the local optimizer's
    (one for one, same order) holding the same options."""

    def __init__(self, user: torch.optim.Optimizer, local: torch.optim.Optimizer) -> None:
        self.user = user
        self.local = local
        self._seen = [_snapshot(g) for g in local.param_groups]

    def sync(self) -> None:
        user_groups, local_groups = self.user.param_groups, self.local.param_groups
        if len(user_groups) != len(local_groups):
            raise RuntimeError(
                f"zerocomm: the optimizer passed to attach has {len(user_groups)} param groups, the "
                f"sharded optimizer {len(local_groups)}: add_param_group after attach is not supported; "
                "add every group before zerocomm.attach"
            )
        for gi, (ug, lg) in enumerate(zip(user_groups, local_groups)):
            seen = self._seen[gi]
            for key in (ug.keys() | lg.keys()) - {"params"}:
                u, lo, s = ug.get(key, _MISSING), lg.get(key, _MISSING), seen.get(key, _MISSING)
                user_changed, local_changed = not _same(u, s), not _same(lo, s)
                if user_changed and local_changed and not _same(u, lo):
                    raise RuntimeError(
                        f"zerocomm: param group {gi}'s {key!r} was changed on both the ZeroOptimizer "
                        f"(to {lo!r}) and the optimizer passed to attach (to {u!r}) since the last step; "
                        "change hyper-parameters (or build the LR scheduler) on one of them only"
                    )
                if user_changed and u is not _MISSING:
                    lg[key] = u
                elif local_changed and lo is not _MISSING:
                    ug[key] = lo
            self._seen[gi] = _snapshot(lg)

    def stepped(self) -> None:
        """An LR scheduler built on the user's optimizer checks that it stepped
        before the scheduler (torch warns "lr_scheduler.step() before
        optimizer.step()" otherwise): the sharded step is its step."""
        self.user._opt_called = True  # type: ignore[attr-defined]
