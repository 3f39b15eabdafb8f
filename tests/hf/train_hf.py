"""One HF training run under torchrun (2 gloo ranks on CPU): the standard
Trainer or an Accelerate loop, with plain AdamW or through zerocomm. Writes
each rank's final parameters (and losses) to OUT/rank{r}.pt.

    torchrun --nproc-per-node 2 tests/hf/train_hf.py KIND VARIANT OUT

KIND: trainer, trainer_resumed or accelerate; VARIANT: plain, broadcast or allgather.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

STEPS, ACCUM, BATCH, MAX_NORM = 4, 2, 2, 0.5


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (STEPS * ACCUM * BATCH * 2, 16), generator=g)
    return [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids]


def optimizers(model: torch.nn.Module, variant: str):
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    if variant.startswith("hier-"):  # hierarchical ZeRO: shard groups of 1, every rank a replica
        import zerocomm

        single = [dist.new_group([r]) for r in range(dist.get_world_size())]
        layout = dict(shard_group=single[dist.get_rank()], replicate_group=dist.group.WORLD)
        opt = zerocomm.attach(model, opt, mode=variant.removeprefix("hier-"), **layout)
    elif variant != "plain":
        import zerocomm

        opt = zerocomm.attach(model, opt, mode=variant)
    return opt, get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=STEPS)


def make_trainer(variant: str, out: str, save_steps: int, callbacks: list | None = None):
    from transformers import Trainer, TrainingArguments

    from zerocomm.integrations.transformers import ZeroTrainer

    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        max_grad_norm=MAX_NORM,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        seed=0,
        ddp_backend="gloo",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = build_model()
    opt, sched = optimizers(model, variant)
    cls = Trainer if variant == "plain" else ZeroTrainer
    trainer = cls(model=model, args=args, train_dataset=dataset(), optimizers=(opt, sched), callbacks=callbacks)
    return model, trainer


GRAD_NORMS: list[float] = []  # this process's run_trainer fills it (one run per process)


def losses_of(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def grad_norms_of(trainer) -> list[float]:
    """The grad_norm Trainer logs (the norm max_grad_norm clipping measured)."""
    return [float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]


def run_trainer(variant: str, out: str) -> tuple[torch.nn.Module, list[float]]:
    model, trainer = make_trainer(variant, out, save_steps=STEPS)
    trainer.train()
    GRAD_NORMS.extend(grad_norms_of(trainer))
    return model, losses_of(trainer)


def run_trainer_resumed(variant: str, out: str) -> tuple[torch.nn.Module, list[float]]:
    """Train half the steps and stop (as a preempted job does), then a fresh
    process state (new model, optimizer, scheduler, Trainer) resumes from the
    checkpoint and trains the rest."""
    from transformers import TrainerCallback

    from zerocomm.integrations.transformers import find_zero_optimizer

    class StopHalfway(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == STEPS // 2:
                control.should_save = True
                control.should_training_stop = True
            return control

    model, trainer = make_trainer(variant, out, save_steps=STEPS, callbacks=[StopHalfway()])
    trainer.train()
    first = losses_of(trainer)
    zopt = find_zero_optimizer(trainer.optimizer)
    if zopt is not None:  # the first run's model is done with: its hooks and comm worker go
        zopt.close()
    checkpoint = os.path.join(out, "trainer", f"checkpoint-{STEPS // 2}")
    model, trainer = make_trainer(variant, out, save_steps=STEPS)
    trainer.train(resume_from_checkpoint=checkpoint)
    return model, first + losses_of(trainer)[len(first) :]


def run_accelerate(variant: str) -> tuple[torch.nn.Module, list[float]]:
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    model = build_model()
    opt, sched = optimizers(model, variant)
    data = torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=False)
    model, opt, data, sched = accelerator.prepare(model, opt, data, sched)
    losses = []
    for batch in data:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
            opt.step()
            sched.step()
            opt.zero_grad()
        losses.append(loss.item())
    return accelerator.unwrap_model(model), losses


def main() -> None:
    kind, variant, out = sys.argv[1:4]
    runs = {"trainer": run_trainer, "trainer_resumed": run_trainer_resumed}
    model, losses = runs[kind](variant, out) if kind in runs else run_accelerate(variant)
    rank = dist.get_rank()
    # state_dict() waits for zerocomm's parameter sync by itself
    params = {n: t.clone() for n, t in model.state_dict().items()}
    torch.save({"params": params, "losses": losses, "grad_norms": GRAD_NORMS}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
