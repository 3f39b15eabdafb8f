"""Shared pieces of the benchmark scripts in benchmarks/.

launch    start the ranks of a job (spawned gloo ranks, torchrun, one-rank NCCL)
overlap   the step-overlap benchmark that benchmarks/overlap.py runs

The scripts put benchmarks/ on sys.path and import `_bench....`; the package is
not installed with zerocomm.
"""
