"""The build records the torch it was compiled against, and the package
refuses to load under any other torch (issue 19: supported torch range)."""

from __future__ import annotations

import re

import pytest
import torch

import zerocomm
from zerocomm import _build_meta, _ext


def test_build_info_reports_the_torch_it_was_built_against() -> None:
    info = zerocomm.build_info()
    assert info["torch_version"] == _build_meta.TORCH_VERSION == torch.__version__
    assert info["cuda"] == _build_meta.CUDA


@pytest.mark.parametrize("running", ["2.10.0+cpu", "9.9.9"])
def test_import_under_another_torch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, running: str) -> None:
    monkeypatch.setattr(torch, "__version__", running)
    expected = f"built against torch {_build_meta.TORCH_VERSION} but torch {running} is running"
    with pytest.raises(ImportError, match=re.escape(expected)):
        _ext.load()


def test_binary_and_build_meta_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """A _build_meta.py left from another build (setup.py rewrites it) is caught too."""
    monkeypatch.setattr(_build_meta, "TORCH_VERSION", "2.0.0")
    monkeypatch.setattr(torch, "__version__", "2.0.0")
    with pytest.raises(ImportError, match="stale build"):
        _ext.load()


def test_supported_range_is_declared_once_per_file() -> None:
    """pyproject.toml and setup.py state the same range (setup.py refuses others)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert root.joinpath("pyproject.toml").read_text().count('"torch>=2.11,<2.16"') == 2
    assert "torch >=2.11,<2.16" in root.joinpath("setup.py").read_text()
