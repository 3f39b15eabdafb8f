"""Loads the compiled core, refusing a binary built against another torch."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

# torch's distributed bindings must be registered before ours refer to them.
import torch.distributed  # noqa: F401


def load() -> ModuleType:  # the module zerocomm/_C.pyi describes
    try:
        from . import _build_meta
    except ImportError as e:
        raise ImportError(
            "zerocomm's native core is not built: run `pip install --no-build-isolation -e .` in the zerocomm checkout"
        ) from e
    if _build_meta.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"zerocomm._C was built against torch {_build_meta.TORCH_VERSION} but torch "
            f"{torch.__version__} is running: rebuild zerocomm "
            "(`pip install --no-build-isolation -e .`) or install the torch it was built with"
        )
    try:
        from . import _C
    except ImportError as e:  # e.g. an undefined symbol: a binary of another torch build
        raise ImportError(
            f"zerocomm._C (built against torch {_build_meta.TORCH_VERSION}) failed to load under torch "
            f"{torch.__version__}: {e}. Rebuild zerocomm (`pip install --no-build-isolation .`)"
        ) from e
    if _C.build_info()["torch_version"] != _build_meta.TORCH_VERSION:
        raise ImportError(
            f"zerocomm._C was built against torch {_C.build_info()['torch_version']} but "
            f"zerocomm/_build_meta.py says {_build_meta.TORCH_VERSION}: a stale build; rebuild zerocomm "
            "(`pip install --no-build-isolation .`)"
        )
    return _C


if TYPE_CHECKING:
    from . import _C  # typed by zerocomm/_C.pyi
else:
    _C = load()
