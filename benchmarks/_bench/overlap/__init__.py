"""Step overlap: how much of the post-step parameter sync each ZeRO-1 scheme hides.

    python benchmarks/overlap.py --device cpu --world-size 2        # ~5 min on 2 cores (7 real variants)
    torchrun --nproc-per-node 1 benchmarks/overlap.py --device cuda # NCCL (world size 1 works)
    python benchmarks/overlap.py --device cpu --transport simulated --sim-bandwidth-gbps 2

Trains zerocomm.testing.models.TinyGPT (size set by flags) for a few steps on the same
model and data in every variant, in one run:

real transport (gloo on CPU, NCCL on CUDA), `--transport real|all`:
  zero_torch      (a) torch.distributed.optim.ZeroRedundancyOptimizer(AdamW). Grads are
                  all-reduced by hand (one flat all_reduce, averaged) after backward;
                  its step() broadcasts every rank's parameters and blocks on them, so
                  that whole param sync is exposed (timed around its _sync_params()).
  seed_bcast      (b) the seed's scheme (InternEvo ParamAsyncBcastHandler), re-implemented
                  here only: owners = optimal contiguous partition by numel over the
                  params in forward order, each rank steps its own params with a local
                  AdamW, then dist.broadcast(p, src=owner, async_op=True) per param on
                  the default group; a forward pre-hook per block (top-level children,
                  ModuleList elements) calls Work.wait() on every pending handle of the
                  ranks that block spans. Grads: same hand all-reduce as (a).
                  exposed = time inside Work.wait(); total = first issue -> last
                  completion (gloo future callbacks) per step.
  zc_broadcast    (c) zerocomm.attach(model, AdamW, mode="broadcast", bucket_mb=...)
  zc_allgather    (d) zerocomm.attach(model, AdamW, mode="allgather", bucket_mb=...)
                  total/exposed from zopt.enable_tracing() / zopt.stats()
                  (sync_total_s: param buckets on the comm lane; sync_exposed_s: time
                  the compute thread waited for them).
  ddp             (e) DistributedDataParallel + unsharded AdamW (no param sync at all;
                  grad all-reduce overlapped with backward). The reference for step time.
  ds_zero1/2      DeepSpeed's ZeRO stage 1 / 2 engines on the same model, data and torch
                  AdamW (fp32, no clipping; CPU: DS_ACCELERATOR=cpu, no C++ ops). Optional:
                  skipped with a note when deepspeed is not installed
                  (requirements-bench.txt). Their param sync sits inside step(): not timed.

simulated transport (zerocomm.transport.SimulatedTransport: world size 1 per process,
the comm worker is occupied for latency + bytes/bandwidth of a modelled ring),
`--transport simulated|all`:
  sim_zc_broadcast, sim_zc_allgather   zerocomm over the simulated transport
  sim_blocking    unsharded AdamW step, then the modelled param-sync time spent
                  synchronously (sleep) before the next forward: exposed == total.
  --auto-sim (default) measures the forward pass first and picks, per mode, the
  bandwidth at which the modelled sync of one step takes as long as that forward
  (bandwidth = factor * param bytes / (forward - n_buckets * latency); factor 1 for
  broadcast, (W-1)/W for the ring all-gather of W = --sim-world ranks).
  Acceptance (printed, stored): zerocomm's exposed sync <= 10% of its total sync
  while the blocking baseline exposes all of it.

The real variants run interleaved: --round-steps steps of each in turn, for
--steps / --round-steps rounds, so a machine whose speed drifts during the run slows
every variant alike. Round 0 is warm-up; in later rounds the first --warmup steps and
the last step are not measured (the last one only closes the step before it).
Between rounds each variant's in-flight work lands untimed (zerocomm: synchronize()).
Simulated variants run alone, one round each, the first 4 steps unmeasured.
Step time = time between consecutive step starts (forward + backward + step),
median and IQR over the measured steps; on CUDA measured with events on the
compute stream (no per-step device sync, which would serialise the comm stream).
Each interval's forward contains the waits for the sync launched by the step
before it, so the intervals are steady-state comparable across variants.
Peak memory: over each variant's round 0 (its optimizer state is created there);
CPU ru_maxrss per rank, reset before it (/proc/self/clear_refs 5); CUDA
torch.cuda.max_memory_allocated. Optimizer-state bytes: tensors (dim > 0) in the
(local) optimizer's state on each rank.

Outputs in --out (default benchmarks/out/): overlap_<device>.json, overlap_<device>.png
(bars), overlap_timeline_<device>.png (one step of zerocomm from its trace) and
overlap_trace_<variant>_<device>.json (Chrome traces, rank 0).
"""
# This docstring is also the --help text (cli.parse_args). The modules:
#   cli            flags and their per-device defaults
#   timers         step phase marks (perf_counter / CUDA events) and peak memory
#   context        what every variant shares on a rank: model, data, optimizer, grad all-reduce
#   seed_scheme    (b), the seed's async-broadcast scheme, re-implemented here only
#   runners/       variant.py (what the loop needs), loop.py (interleaved rounds), one module
#                  per family of variants: torch_baselines, seed, zerocomm_runs, simulated,
#                  deepspeed_runs
#   driver         what one rank runs: every variant, then the gather and the outputs on rank 0
#   report         the JSON report and the printed table
#   plots          the bar chart and the timeline
#   main           picks how the ranks are started (../launch.py)
