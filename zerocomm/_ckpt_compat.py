"""One tensor saved as one chunk of a larger tensor, on every supported torch.

zerocomm saves each rank's slice of an optimizer-state tensor as a chunk of the
whole ([`_ckpt_state._piece`]). torch >= 2.12's DCP reads that off four tensor
attributes (`global_shape`, `global_offsets`, `local_offsets`, `local_sizes`:
`torch.distributed.checkpoint.protocol`). torch 2.11's DCP does not know them
and would save every rank's slice as the whole tensor at offset 0 -- one
rank's slice kept, the others silently dropped, and loads that fail on the
size. Its older hooks (`__create_write_items__`, `__create_chunk_list__`,
`__get_tensor_shard__`, which DTensor implements) express the same chunk, so
on such a torch they are attached as well.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

# The attribute protocol exists: nothing to add.
HAS_CHUNK_PROTOCOL = importlib.util.find_spec("torch.distributed.checkpoint.protocol") is not None


def add_legacy_chunk_hooks(t: torch.Tensor, start: int, total: int) -> None:
    """Make `t` (1-D, elements [start, start + numel) of a tensor of `total`)
    one chunk of that tensor for a DCP without the attribute protocol."""
    if HAS_CHUNK_PROTOCOL:
        return
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    chunk = ChunkStorageMetadata(offsets=torch.Size((start,)), sizes=torch.Size((t.numel(),)))

    def create_write_items(fqn: str, obj: object) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,  # a chunk: one entry per rank, merged in the metadata
                tensor_data=TensorWriteData(
                    chunk=chunk, properties=TensorProperties.create_from_tensor(t), size=torch.Size((total,))
                ),
            )
        ]

    def create_chunk_list() -> list[ChunkStorageMetadata]:
        return [chunk]

    def get_tensor_shard(index: MetadataIndex) -> torch.Tensor:
        if index.offset is not None and torch.Size(index.offset) != chunk.offsets:
            raise ValueError(f"{index.fqn}: this rank holds the chunk at {tuple(chunk.offsets)}, not {index.offset}")
        return t

    # Instance attributes: DCP looks them up with hasattr() and calls them.
    setattr(t, "__create_write_items__", create_write_items)
    setattr(t, "__create_chunk_list__", create_chunk_list)
    setattr(t, "__get_tensor_shard__", get_tensor_shard)


def is_legacy_chunk(obj: object) -> bool:
    """A tensor `add_legacy_chunk_hooks` tagged (instance attribute)."""
    return isinstance(obj, torch.Tensor) and "__create_chunk_list__" in getattr(obj, "__dict__", {})


def legacy_local_load_plan(state_dict: dict[str, Any], metadata: Any, strict: bool) -> Any:
    """torch 2.11's `create_default_local_load_plan`, except that a tagged chunk
    is read as the chunk it is: that function compares each plain tensor's own
    size with the saved tensor's and refuses the slice before the resharding
    reads it."""
    import dataclasses

    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
    from torch.distributed.checkpoint.planner_helpers import _create_read_items

    chunked = {k: v for k, v in state_dict.items() if is_legacy_chunk(v)}
    plan = create_default_local_load_plan({k: v for k, v in state_dict.items() if k not in chunked}, metadata, strict)
    items = list(plan.items)
    for fqn, obj in chunked.items():
        md = metadata.state_dict_metadata.get(fqn)
        if md is None:
            if strict:
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            continue
        items += _create_read_items(fqn, md, obj)
    return dataclasses.replace(plan, items=items)
