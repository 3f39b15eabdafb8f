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

        value = getattr(flat, name)
    elif name == "attach":
        from .api import attach as value
    elif name == "SimulatedTransport":
        from .transport import SimulatedTransport as value
    else:
        raise AttributeError(f"module 'zerocomm' has no attribute {name!r}")
    # Bound once: later lookups are a plain module attribute, not an import
    # (`zerocomm.unflatten(...)` in a hot loop paid ~3 us per call here).
    globals()[name] = value
    return value


__all__ = ["attach", "build_info", "flatten", "unflatten", "FlatLayout", "SimulatedTransport", "__version__"]
