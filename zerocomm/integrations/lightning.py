"""PyTorch Lightning with a zerocomm optimizer.

    from zerocomm.integrations.lightning import ZeroDDPStrategy

    class Model(pl.LightningModule):
        def configure_optimizers(self):
            return zerocomm.attach(self, torch.optim.AdamW(self.parameters(), lr=...), mode="allgather")

    trainer = pl.Trainer(strategy=ZeroDDPStrategy(), gradient_clip_val=1.0, ...)

Lightning clips the tensors in `optimizer.param_groups`, which for a
ZeroOptimizer are this rank's shards (before the step binds their
gradients): the clip would be silently skipped or use a shard's norm.
`ZeroDDPStrategy` is Lightning's `DDPStrategy` (same arguments) whose
precision plugin, whichever the Trainer picks, clips a ZeroOptimizer's
gradients with `zopt.clip_grad_norm_` (the global norm) and
`zopt.clip_grad_value_`; any other optimizer is clipped as Lightning does.
Under DDP zerocomm steps DDP's averaged gradients ([Note: DDP-wrapped
models]), so both algorithms are exact against plain torch.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import DDPStrategy

from . import find_zero_optimizer


class ZeroClipping:
    """Mixed in before the class of the Trainer's precision plugin."""

    def clip_grad_by_value(self, optimizer: Any, clip_val: float) -> None:
        zopt = find_zero_optimizer(optimizer)
        if zopt is None:
            super().clip_grad_by_value(optimizer, clip_val)  # type: ignore[misc]
        else:
            zopt.clip_grad_value_(float(clip_val))

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        zopt = find_zero_optimizer(optimizer)
        if zopt is None:
            super().clip_grad_by_norm(optimizer, clip_val)  # type: ignore[misc]
        else:
            zopt.clip_grad_norm_(float(clip_val))


def with_zero_clipping(plugin: Precision | None) -> Precision:
    """The plugin, its class swapped for a subclass (named as it) that clips
    a ZeroOptimizer's gradients exactly; isinstance checks still hold."""
    plugin = plugin if plugin is not None else Precision()
    cls = type(plugin)
    if not issubclass(cls, ZeroClipping):
        plugin.__class__ = type(cls.__name__, (ZeroClipping, cls), {"__module__": cls.__module__})
    return plugin


class ZeroDDPStrategy(DDPStrategy):
    """`DDPStrategy` for LightningModules whose `configure_optimizers`
    returns `zerocomm.attach(self, optimizer, ...)`."""

    strategy_name = "zerocomm_ddp"

    @property
    def precision_plugin(self) -> Precision:
        if self._precision_plugin is None:
            self._precision_plugin = with_zero_clipping(None)
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        self._precision_plugin = with_zero_clipping(plugin) if plugin is not None else None
