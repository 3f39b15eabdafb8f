"""Opens zerocomm's own communicator and comm stream for a process group.

zerocomm never issues its collectives on the user's process group: the CPU
worker (or the comm stream) would race the user's own collectives. On CUDA it
creates its own NCCL communicator from a unique id exchanged once over the
user's group; on CPU a private gloo backend on a fresh prefix of the default
store. Both therefore work wherever torch.distributed works.
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple, cast

import torch
import torch.distributed as dist

from ._ext import _C

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SimulatedTransport:
    """A world-size-1 transport that occupies the comm stream for a modelled
    time: latency + bytes / bandwidth of a ring of `modelled_world` ranks.
    For benchmarks on one GPU or one CPU core; never the default.

    Two tiers (hierarchical ZeRO): `latency_us`/`bandwidth_gbps` are the
    shard group's tier (intra-node, modelled_world = L ranks); with
    `replicas` = M > 1 every gradient shard is also all-reduced across M
    modelled replicas on the inter-node tier (`inter_latency_us`,
    `inter_bandwidth_gbps`; by default the same as the first tier). Latencies
    are per collective, not per ring step ([Note: simulated cost] in
    csrc/simulated_communicator.cpp); benchmarks/scale_model.py
    (`sim_transports`) derives both tiers from its model of a cluster."""

    latency_us: float = 50.0
    bandwidth_gbps: float = 10.0
    modelled_world: int = 8
    replicas: int = 1
    inter_latency_us: float = 50.0
    inter_bandwidth_gbps: float = 10.0

    def replica_communicator(self) -> "_C.Communicator | None":
        """The inter-node tier's communicator (None when flat: replicas == 1).
        Its tensor is this process's whole gradient bucket, where a rank of the
        modelled cluster all-reduces its 1/L shard: shard_of = modelled_world."""
        if self.replicas == 1:
            return None  # (0 or less: the native core's ValueError)
        return _C.simulated_communicator(
            self.inter_latency_us, self.inter_bandwidth_gbps, self.replicas, shard_of=self.modelled_world
        )


@dataclass
class Transport:
    stream: "_C.Stream"
    comm: "_C.Communicator"  # the shard group's
    rank: int  # in the shard group
    world_size: int  # the shard group's size (L)
    timeout_s: float
    # hierarchical ZeRO: all-reduces each reduced gradient shard across the
    # replicas of the shard ([Note: hierarchical layout]); None when flat
    replica: "_C.Communicator | None" = None
    replica_size: int = 1  # M: ranks the replica communicator spans (1: none)


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) before zerocomm.attach"
        )
    return group if group is not None else cast(dist.ProcessGroup, dist.group.WORLD)


def group_timeout_s(group: dist.ProcessGroup) -> float:
    """The process group's own timeout, so zerocomm fails no sooner or later.

    Asks the group's CPU backend (gloo), then its CUDA backend (NCCL: a pure
    NCCL group has no CPU backend), then torch's default for the group's
    backend; DEFAULT_TIMEOUT_S only when none of them answers."""
    for device in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(device))
            return float(backend.options._timeout.total_seconds())
        except Exception:  # no backend for this device, or no options exposed
            continue
    try:
        c10d = dist.distributed_c10d
        return float(c10d._get_default_timeout(dist.get_backend(group)).total_seconds())
    except Exception:
        return DEFAULT_TIMEOUT_S


def _broadcast_from_group_rank0(value: object, group: dist.ProcessGroup | None) -> object:
    box = [value]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


class PrivateGloo(NamedTuple):
    """A gloo backend of zerocomm's own and the store prefix it rendezvoused on."""

    backend: dist.ProcessGroupGloo
    store: dist.PrefixStore


def private_gloo(group: dist.ProcessGroup | None, tag: str, timeout_s: float) -> PrivateGloo:
    """A gloo backend of zerocomm's own over the ranks of `group`, on a fresh
    prefix of the default store (rank 0 of the group picks it): never the
    user's group, which may be busy with the user's own collectives. The one
    place such a backend is made (the CPU transport, the presence vote, which
    also posts to the store: [Note: diverged ranks])."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    prefix = cast(str, _broadcast_from_group_rank0(f"{tag}/{uuid.uuid4().hex}" if rank == 0 else None, group))
    store = dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())
    return PrivateGloo(dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=timeout_s)), store)


def open_transport(
    group: dist.ProcessGroup,
    device: torch.device,
    transport: str | SimulatedTransport,
    timeout_s: float,
    high_priority: bool,
    replicate_group: dist.ProcessGroup | None = None,
) -> Transport:
    """The comm stream and the communicator of `group` (the shard group),
    and with `replicate_group` the replica communicator beside it."""
    cuda_index = device.index if device.type == "cuda" else -1
    if device.type == "cuda" and cuda_index is None:
        cuda_index = torch.cuda.current_device()
    stream = _C.make_stream(cuda_index, high_priority)
    if isinstance(transport, SimulatedTransport):
        comm = _C.simulated_communicator(transport.latency_us, transport.bandwidth_gbps, transport.modelled_world)
        return Transport(stream, comm, 0, 1, timeout_s, transport.replica_communicator(), 1)
    # transport == "auto" (attach checked it: validate.check_options)
    if device.type == "cuda" and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
        warnings.warn(
            "CUDA_DEVICE_MAX_CONNECTIONS=1 serialises CUDA streams: zerocomm's parameter "
            "sync will not overlap the forward pass. Unset it (Megatron-style launchers set it).",
            RuntimeWarning,
            stacklevel=3,
        )
    comm = _communicator(group, device, cuda_index, timeout_s, "zerocomm")
    replica, replica_size = None, 1
    if replicate_group is not None and dist.get_world_size(replicate_group) > 1:
        replica = _communicator(replicate_group, device, cuda_index, timeout_s, "zerocomm-replica")
        replica_size = dist.get_world_size(replicate_group)
    return Transport(stream, comm, dist.get_rank(group), dist.get_world_size(group), timeout_s, replica, replica_size)


def _communicator(
    group: dist.ProcessGroup, device: torch.device, cuda_index: int, timeout_s: float, tag: str
) -> "_C.Communicator":
    """zerocomm's own communicator over the ranks of `group`: NCCL on CUDA,
    a private gloo backend on CPU."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if device.type == "cuda":
        if not _C.build_info()["cuda"]:
            raise ValueError("zerocomm was built without CUDA: rebuild it with CUDA_HOME set")
        uid = cast(bytes, _broadcast_from_group_rank0(_C.nccl_unique_id() if rank == 0 else None, group))
        return _C.nccl_communicator(uid, rank, size, cuda_index, int(timeout_s * 1000))
    return _C.c10d_communicator(private_gloo(group, tag, timeout_s).backend, int(timeout_s * 1000))
