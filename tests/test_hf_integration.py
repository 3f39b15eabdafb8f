"""HF Trainer and an Accelerate loop under torchrun (2 gloo ranks), with
zerocomm in both modes, against the same run with plain AdamW: gradient
clipping (max_grad_norm / accelerator.clip_grad_norm_), gradient
accumulation over DDP's no_sync, a warmup scheduler, and (Trainer) a
checkpoint save, which consolidates the optimizer state on every rank, and a
run stopped halfway and resumed from its checkpoint."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import free_port

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = Path(__file__).parent / "hf" / "train_hf.py"
VARIANTS = ("plain", "broadcast", "allgather")


@functools.lru_cache(maxsize=None)
def _run(kind: str, variant: str, out: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        str(SCRIPT),
        kind,
        variant,
        out,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{kind} {variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("variant", VARIANTS[1:])
@pytest.mark.parametrize("kind", ["trainer", "accelerate"])
def test_matches_plain_adamw(kind: str, variant: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    want = _run(kind, "plain", str(base / f"{kind}-plain"))
    got = _run(kind, variant, str(base / f"{kind}-{variant}"))
    # Trainer logs one loss per optimizer step, the Accelerate loop one per micro-batch
    assert len(want[0]["losses"]) == (4 if kind == "trainer" else 4 * 2)
    for r in range(2):
        assert got[r]["losses"] == pytest.approx(want[r]["losses"], abs=1e-5), f"rank {r} losses"
        # the grad_norm Trainer logs is the global norm, as with plain AdamW
        assert got[r]["grad_norms"] == pytest.approx(want[r]["grad_norms"], rel=1e-5), f"rank {r} grad_norm"
        assert len(want[r]["grad_norms"]) == (4 if kind == "trainer" else 0)
        ps, ws = got[r]["params"], want[r]["params"]
        assert ps.keys() == ws.keys()
        worst = max((ps[n].float() - ws[n].float()).abs().max().item() for n in ps)
        assert worst < 1e-5, f"{kind} {variant} rank {r}: max |delta| {worst:.3g} against plain AdamW"
        for n in ps:
            assert torch.equal(ps[n], got[0]["params"][n]), f"ranks differ in {n}"
    if kind == "trainer":  # the checkpoint's optimizer state is the plain optimizer's
        ck = next((base / f"{kind}-{variant}" / "trainer").glob("checkpoint-*"))
        ref = next((base / f"{kind}-plain" / "trainer").glob("checkpoint-*"))
        a, b = torch.load(ck / "optimizer.pt"), torch.load(ref / "optimizer.pt")
        assert a["state"].keys() == b["state"].keys()
        for i in a["state"]:
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(a["state"][i][k], b["state"][i][k], rtol=1e-4, atol=1e-6)


def test_trainer_hierarchical_matches_plain_adamw(tmp_path_factory: pytest.TempPathFactory) -> None:
    """ZeroTrainer over a hierarchical layout (shard groups of one rank, both
    ranks replicas; Trainer wraps the model in DDP over the world)."""
    test_matches_plain_adamw("trainer", "hier-allgather", tmp_path_factory)


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_trainer_resume_matches_plain_adamw(variant: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A job stopped halfway and resumed with `trainer.train(resume_from_checkpoint=...)`
    (model, optimizer state, scheduler, RNG and data position from the
    checkpoint) ends where the same stop-and-resume with plain AdamW ends, and
    where the uninterrupted zerocomm run ends."""
    base = tmp_path_factory.getbasetemp()
    want = _run("trainer_resumed", "plain", str(base / "resumed-plain"))
    got = _run("trainer_resumed", variant, str(base / f"resumed-{variant}"))
    straight = _run("trainer", variant, str(base / f"trainer-{variant}"))
    assert len(got[0]["losses"]) == 4
    for r in range(2):
        assert got[r]["losses"] == pytest.approx(want[r]["losses"], abs=1e-5), f"rank {r} losses"
        assert got[r]["losses"] == pytest.approx(straight[r]["losses"], abs=1e-5), f"rank {r} losses vs no stop"
        for ref, what in ((want, "the resumed plain AdamW run"), (straight, "the run without a stop")):
            ps, ws = got[r]["params"], ref[r]["params"]
            assert ps.keys() == ws.keys()
            worst = max((ps[n].float() - ws[n].float()).abs().max().item() for n in ps)
            assert worst < 1e-5, f"resumed {variant} rank {r}: max |delta| {worst:.3g} against {what}"
        for n in got[r]["params"]:
            assert torch.equal(got[r]["params"][n], got[0]["params"][n]), f"ranks differ in {n}"
