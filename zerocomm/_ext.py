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
    from . import _C

    return _C


if TYPE_CHECKING:
    from . import _C  # typed by zerocomm/_C.pyi
else:
    _C = load()
