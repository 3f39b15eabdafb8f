"""The public, read-only view of a sharded optimizer that state_dict
consolidation and checkpoints work from (so they never read ZeroOptimizer's
private fields, and never import it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class ShardPiece:
    """One tensor this rank's local optimizer steps, and where it belongs."""

    index: int  # the model parameter's position in the user's optimizer order
    start: int  # element offset inside that parameter (allgather pieces; 0 in broadcast mode)
    numel: int
    group: int  # the user's param group
    tensor: torch.Tensor  # what the local optimizer steps: the parameter itself or its master


class StateFormat(Protocol):
    """How the unsharded optimizer's state_dict is assembled from (and split
    into) every rank's shard: zerocomm.optimizer_state, handed to the
    optimizer by attach, so the optimizer knows no state format itself."""

    def consolidated_state_dict(self, zopt: Any, to_rank: int | None = None) -> dict: ...

    def load_consolidated_state_dict(self, zopt: Any, sd: dict) -> None: ...


class ShardedOptimizer(Protocol):
    """What ZeroOptimizer offers to state_dict consolidation and checkpoints."""

    mode: str
    optim: torch.optim.Optimizer  # the user's optimizer class over this rank's pieces

    @property
    def pieces(self) -> tuple[ShardPiece, ...]: ...

    @property
    def user_params(self) -> tuple[torch.Tensor, ...]: ...

    @property
    def user_group_sizes(self) -> tuple[int, ...]: ...

    @property
    def param_names(self) -> tuple[str, ...]: ...

    @property
    def chunks(self) -> tuple[torch.nn.Module, ...]: ...

    @property
    def group(self) -> Any: ...  # the group the dense plan shards over (its shard group)

    @property
    def process_groups(self) -> dict[str, Any]: ...  # per plan (dense, expert): the shard group

    @property
    def layouts(self) -> dict[str, Any]: ...  # per plan: its layout.DPLayout (shard group, replicas)

    @property
    def world_size(self) -> int: ...  # the dense plan's shard group size

    def synchronize(self) -> None: ...

    def refresh_masters(self) -> None: ...
