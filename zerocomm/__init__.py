"""zerocomm: a ZeRO-1 communication runtime for PyTorch."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """How the native core was built: CUDA compiled?, CUDA/NCCL/torch versions."""
    from ._ext import _C

    return dict(_C.build_info())


def __getattr__(name: str) -> Any:
    # Lazy: `zerocomm.partition` and friends import without the native core.
    if name in ("flatten", "unflatten", "FlatLayout"):
        from . import flat

        return getattr(flat, name)
    if name == "attach":
        from .api import attach

        return attach
    if name == "SimulatedTransport":
        from .transport import SimulatedTransport

        return SimulatedTransport
    raise AttributeError(f"module 'zerocomm' has no attribute {name!r}")


__all__ = ["attach", "build_info", "flatten", "unflatten", "FlatLayout", "SimulatedTransport", "__version__"]
