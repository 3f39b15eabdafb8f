"""HF `transformers.Trainer` with a zerocomm optimizer.

    zopt = zerocomm.attach(model, torch.optim.AdamW(model.parameters(), lr=...), mode="allgather")
    sched = transformers.get_linear_schedule_with_warmup(zopt, warmup, total)
    trainer = ZeroTrainer(model=model, args=args, train_dataset=ds, optimizers=(zopt, sched))

Under torchrun, Trainer (through Accelerate) wraps the model in
DistributedDataParallel: zerocomm then steps DDP's all-reduced gradients
(see docs/design.md, [Note: DDP-wrapped models]), so `max_grad_norm`,
`gradient_accumulation_steps` and every callback see exactly what they see
with a plain optimizer. The plain `Trainer` trains correctly too; this
subclass adds what needs every rank: the optimizer state is consolidated by a
collective, so saving it cannot run on the main process alone. Resuming
(`trainer.train(resume_from_checkpoint=...)`) loads the consolidated file on
every rank, which `ZeroOptimizer.load_state_dict` splits into this rank's
shard.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from . import find_zero_optimizer

__all__ = ["ZeroTrainer", "find_zero_optimizer"]


class ZeroTrainer(Trainer):
    """`transformers.Trainer` whose checkpoints work with a zerocomm optimizer."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        zopt = find_zero_optimizer(self.optimizer)
        if zopt is None:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        # Every rank takes part in the consolidation; Trainer then writes the
        # result from the main process as it would a plain optimizer's.
        state = zopt.state_dict()
        zopt.state_dict = lambda *args, **kwargs: state  # type: ignore[method-assign]
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del zopt.state_dict
        torch.distributed.barrier() if torch.distributed.is_initialized() else None
