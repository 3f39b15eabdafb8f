"""The benchmark scripts as a user runs them, on a tiny configuration: they
finish, write their JSON, and what they compare is comparable (every
real-transport variant trains to the same loss). No timing is asserted:
speed lives in benchmarks/results/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_overlap_interleaved_variants_train_the_same_model(tmp_path: Path) -> None:
    out = _run(
        [
            "benchmarks/overlap.py",
            "--device=cpu",
            "--world-size=2",
            "--transport=real",
            "--variants=zero_torch,seed_bcast,zc_broadcast,zc_allgather,ddp",
            "--dim=32",
            "--layers=2",
            "--heads=2",
            "--seq=16",
            "--vocab=64",
            "--batch=2",
            "--steps=9",
            "--round-steps=3",
            "--bucket-mb=0.01",
            f"--out={tmp_path}",
        ],
        timeout=300,
    )
    rep = json.loads((tmp_path / "overlap_cpu.json").read_text())
    variants = rep["variants"]
    assert set(variants) == {"zero_torch", "seed_bcast", "zc_broadcast", "zc_allgather", "ddp"}, out
    # 3 rounds of 3: round 0 warm-up, then step 1 of each round (closed by step 2)
    for v, d in variants.items():
        r0 = d["per_rank"][0]
        assert r0["measured_steps"] == [4, 7], v
        assert len(r0["step_s"]) == 2 and all(t > 0 for t in r0["step_s"]), v
        assert len(r0["losses"]) == 9, v
    losses = {v: d["per_rank"][0]["losses"] for v, d in variants.items()}
    ref = losses["ddp"]
    for v, ls in losses.items():
        assert max(abs(a - b) for a, b in zip(ls, ref)) < 1e-4, (v, ls, ref)
    # zerocomm's figures come from its own trace: every measured step was traced
    for v in ("zc_broadcast", "zc_allgather"):
        r0 = variants[v]["per_rank"][0]
        assert r0["traced_syncs"] == 6 and r0["sync_total_per_step_s"] > 0, (v, r0["traced_syncs"])


def test_collectives_benchmark_writes_every_method(tmp_path: Path) -> None:
    _run(
        ["benchmarks/collectives.py", "--world-sizes=2", "--sizes-mib=0.25", "--calls=8", f"--out={tmp_path}"],
        timeout=180,
    )
    rows = json.loads((tmp_path / "collectives_cpu.json").read_text())["results"]
    methods = {r["method"] for r in rows}
    assert methods == {"all_reduce", "reduce_scatter", "rs_allreduce", "rs_reduces", "all_gather", "ag_broadcasts"}
    assert all(r["wall_ms"] > 0 for r in rows)
