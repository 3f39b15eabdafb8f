"""Reading a checkpoint without running code from it.

DCP's `.metadata` is a pickle and DCP loads non-tensor entries with
`torch.load(weights_only=False)`: either would run whatever a crafted file
asks for. Here `.metadata` goes through an unpickler that admits only the
classes DCP writes into it (`trusted=True` skips that), and every other
object is read with `weights_only=True`.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ._ckpt_compat import HAS_CHUNK_PROTOCOL, legacy_local_load_plan
from ._ckpt_fs import (
    ENTRIES,
    FORMAT,
    MARKER,
    METADATA,
    CheckpointError,
    read_marker,
    short_weights_only_error,
    verify,
)

_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit only the classes DCP writes into
    it, so a crafted file cannot call anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not one of the classes torch.distributed.checkpoint writes "
            "into .metadata; refusing to call it (pass trusted=True only for a file you trust)"
        )


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose `read_metadata` uses the restricted unpickler
    unless the user vouches for the file (`trusted=True`)."""

    def __init__(self, path: str, *, trusted: bool) -> None:
        super().__init__(path)
        self.trusted = trusted

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.trusted:
            return super().read_metadata(*args, **kwargs)
        file = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(file, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except Exception as e:
                raise CheckpointError(f"refusing {file}: {e}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{file} does not hold torch.distributed.checkpoint Metadata")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


def _safe_load_bytes(planner: DefaultLoadPlanner, read_item: Any, value: io.BytesIO) -> None:
    # DCP's own load_bytes uses torch.load(weights_only=False): code could run
    obj = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    load_bytes = _safe_load_bytes

    def create_local_plan(self) -> Any:
        if HAS_CHUNK_PROTOCOL:
            return super().create_local_plan()
        # torch 2.11: read zerocomm's slices as chunks (_ckpt_compat)
        return legacy_local_load_plan(self.state_dict, self.metadata, not self.allow_partial_load)


class SafeEmptyLoadPlanner(_EmptyStateDictLoadPlanner):
    load_bytes = _safe_load_bytes


@dataclass
class Opened:
    """A checkpoint's plain-data parts, read without running code from it."""

    path: str
    marker: dict
    entries: dict
    metadata: Metadata


def open_checkpoint(path: str, trusted: bool) -> Opened:
    marker = read_marker(path)
    if marker is None:
        raise FileNotFoundError(f"{path} is not a zerocomm checkpoint (no valid {MARKER})")
    if marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise ValueError(f"{path} has checkpoint format {marker.get('format')!r}; this zerocomm reads format {FORMAT}")
    entries_file = os.path.join(path, ENTRIES)
    verify(path, marker, [ENTRIES, METADATA])
    try:
        entries = torch.load(entries_file, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"refusing {entries_file}: not plain data ({short_weights_only_error(e)})") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{entries_file} does not hold zerocomm's entries")
    metadata = SafeReader(path, trusted=trusted).read_metadata()
    # every file DCP will open must be one the marker lists (and checksums)
    stray = sorted({i.relative_path for i in metadata.storage_data.values()} - marker["files"].keys())
    if stray:
        raise CheckpointError(f"{path}/.metadata refers to files the checkpoint does not list: {stray}")
    return Opened(path, marker, entries, metadata)


def check_unchanged(opened: Opened) -> None:
    """After reading: a save that replaced the directory meanwhile would have
    mixed two checkpoints into what was read."""
    now = read_marker(opened.path)
    if now is None or now.get("token") != opened.marker.get("token"):
        raise CheckpointError(f"{opened.path} was replaced by another save while it was being read: load again")
