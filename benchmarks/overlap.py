"""Step overlap: how much of the post-step parameter sync each ZeRO-1 scheme hides.

    python benchmarks/overlap.py --device cpu --world-size 2        # ~5 min on 2 cores (7 real variants)
    torchrun --nproc-per-node 1 benchmarks/overlap.py --device cuda # NCCL (world size 1 works)
    python benchmarks/overlap.py --device cpu --transport simulated --sim-bandwidth-gbps 2

The variants, what is measured and the outputs: `--help`, or the docstring of
benchmarks/_bench/overlap/__init__.py, where the code lives.
"""

from __future__ import annotations

import os
import sys

# benchmarks/ on the path: the script runs as a file (python, torchrun), not as a
# module of an installed package; spawned ranks inherit the path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench.overlap.main import main  # noqa: E402

if __name__ == "__main__":
    main()
