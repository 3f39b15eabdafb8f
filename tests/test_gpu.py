"""The GPU acceptance tests (issue 9), skipped without a CUDA device.

One process, NCCL world size 1 (an in-process HashStore), so they run on a
single GPU under plain pytest or `benchmarks/gpu_suite.sh`. Set
ZEROCOMM_GPU_OUT to a folder to keep the profiler trace of the overlap test.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
STEPS = 20


@pytest.fixture(scope="module")
def nccl_world1() -> Iterator[None]:
    import zerocomm

    if not zerocomm.build_info()["cuda"]:
        pytest.skip("zerocomm was built without CUDA")
    torch.cuda.set_device(0)
    owned = not dist.is_initialized()
    if owned:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    if owned:
        dist.destroy_process_group()


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(64, 1)).to("cuda", dtype)


def _batch(step: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(step)
    return torch.randn(32, 64, device="cuda", generator=g).to(dtype)


def _reference(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[float]]:
    """Plain AdamW (fp32 masters stepped, cast to the model dtype)."""
    model = _model(dtype)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    opt = torch.optim.AdamW(masters, lr=1e-3, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        loss = model(_batch(step, dtype)).float().square().mean()
        loss.backward()
        for m, p in zip(masters, model.parameters()):
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for m, p in zip(masters, model.parameters()):
                p.copy_(m)
        losses.append(loss.item())
    return [p.detach().clone() for p in model.parameters()], losses


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero_copy"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["serial_step", "pipelined"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_fp32_masters"])
@pytest.mark.parametrize("mode", ["broadcast", "allgather"])
def test_adamw_matrix(nccl_world1: None, mode: str, dtype: torch.dtype, pipeline: bool, zero_copy: bool) -> None:
    import zerocomm

    ref_params, ref_losses = _reference(dtype)
    model = _model(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    extra = {"master_dtype": torch.float32} if dtype != torch.float32 else {}
    zopt = zerocomm.attach(model, opt, mode=mode, bucket_mb=0.01, zero_copy=zero_copy, pipeline_step=pipeline, **extra)
    losses = []
    try:
        for step in range(STEPS):
            if step == 2:  # warm-up done: from here on no hidden host sync
                torch.cuda.set_sync_debug_mode("error")
            loss = model(_batch(step, dtype)).float().square().mean()
            loss.backward()
            zopt.step()
            zopt.zero_grad()
            losses.append(loss.detach())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    zopt.synchronize()
    got = [p.detach().clone() for p in model.parameters()]
    zopt.close()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for i, (a, b) in enumerate(zip(got, ref_params)):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=0, msg=f"param {i}")
    torch.testing.assert_close(
        torch.stack(losses).cpu(), torch.tensor(ref_losses), atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=0
    )


SIM_LATENCY_US = 200_000.0  # 0.2 s per collective: far longer than a forward


def test_overlap_on_comm_stream(nccl_world1: None) -> None:
    import zerocomm
    from zerocomm._ext import _C

    model = _model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    zopt = zerocomm.attach(
        model,
        opt,
        mode="allgather",
        bucket_mb=1.0,
        transport=zerocomm.transport.SimulatedTransport(latency_us=SIM_LATENCY_US),
    )
    x = _batch(0, torch.float32)
    for _ in range(2):
        model(x).square().mean().backward()
        zopt.step()
        zopt.zero_grad()
    zopt.synchronize()
    torch.cuda.synchronize()
    model(x).square().mean().backward()
    zopt.step()
    t0 = time.perf_counter()
    out = model(x)  # waits GPU-side for its buckets: the host returns at once
    host_s = time.perf_counter() - t0
    zopt.synchronize()
    ref = model(x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert host_s < SIM_LATENCY_US * 1e-6 / 4, f"forward blocked the host for {host_s:.3f} s"

    # negative control: without the hook's wait the forward reads stale params
    zopt.zero_grad()
    model(x).square().mean().backward()
    zopt.step()
    wait = _C.SyncScheduler.wait_param
    _C.SyncScheduler.wait_param = lambda self, bucket: None
    try:
        stale = model(x)
    finally:
        _C.SyncScheduler.wait_param = wait
    zopt.synchronize()
    assert not torch.equal(stale, model(x)), "the negative control was not caught"

    out_dir = os.environ.get("ZEROCOMM_GPU_OUT")
    if out_dir:
        from torch.profiler import ProfilerActivity, profile

        zopt.zero_grad()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(x).square().mean().backward()
            zopt.step()
            model(x)
            torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(out_dir, "overlap_gpu_trace.json"))
        names = {e.name for e in prof.events()}
        assert any("spin_kernel" in n for n in names), "no comm kernel in the trace"
    zopt.close()


def test_abort_then_check_and_close(nccl_world1: None) -> None:
    import zerocomm

    model = _model(torch.float32)
    sync = zerocomm.attach(model)  # zerocomm's own NCCL communicator
    sync.launch()
    sync.synchronize()
    sched = sync.units[0].sched
    sched.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        sched.check()
    with pytest.raises(RuntimeError, match="aborted"):
        sched.launch([0])
    t0 = time.monotonic()
    sync.close()
    assert time.monotonic() - t0 < 5


def test_stalled_transport_host_sync_returns(nccl_world1: None) -> None:
    import zerocomm

    model = _model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    zopt = zerocomm.attach(
        model, opt, mode="allgather", timeout=2.0, transport=zerocomm.transport.SimulatedTransport(latency_us=3e8)
    )
    x = _batch(0, torch.float32)
    t0 = time.monotonic()
    try:
        model(x).square().mean().backward()  # no sync launched yet: runs
        zopt.step()  # launches a 300 s simulated sync
        model(x).sum().item()  # GPU waits; the watchdog aborts it
    except RuntimeError:
        pass
    assert time.monotonic() - t0 < 2.0 + 1.5
    with pytest.raises(RuntimeError, match="timed out|aborted"):
        zopt.synchronize()
    c0 = time.monotonic()
    zopt.close()
    assert time.monotonic() - c0 < 3


def test_fused_copy_oom_is_torch_oom(nccl_world1: None) -> None:
    import zerocomm

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    src = [torch.ones(16 << 20, device="cuda") for _ in range(4)]  # 256 MiB
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + (64 << 20)) / total)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            zerocomm.flatten(src)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    del src
    torch.cuda.empty_cache()


def test_flatten_70k_chunk_grid() -> None:
    """70,000 tensors, one CTA each: a grid far past 65,535 in one launch.
    Views of one buffer, so the sanitizer run sees few allocations."""
    import zerocomm

    base = torch.arange(70_000 * 1000, device="cuda", dtype=torch.float32)
    flat = zerocomm.flatten(list(base.split(1000)))
    cpu = zerocomm.flatten(list(base.cpu().split(1000)))
    assert torch.equal(flat.cpu(), cpu)


def test_flatten_3gib_bf16() -> None:
    """A 3 GiB bf16 tensor (plus a small one before it): 64-bit offsets."""
    import zerocomm

    n = 3 * (1 << 30) // 2
    big = torch.randint(-32768, 32767, (n,), dtype=torch.int16, device="cuda").view(torch.bfloat16)
    small = torch.randint(-32768, 32767, (777,), dtype=torch.int16, device="cuda").view(torch.bfloat16)
    flat = zerocomm.flatten([small, big])
    cpu = zerocomm.flatten([small.cpu(), big.cpu()])
    assert torch.equal(flat.cpu().view(torch.int16), cpu.view(torch.int16))


def test_flatten_over_2_31_elements() -> None:
    """More than 2^31 elements in one tensor (uint8, 2 GiB + 4099 bytes, and
    a small tensor before it): element offsets and counts need 64 bits."""
    import zerocomm

    n = (1 << 31) + 4099
    big = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    small = torch.randint(0, 256, (777,), dtype=torch.uint8, device="cuda")
    layout = zerocomm.FlatLayout([small, big], align_bytes=16)
    assert layout.total_numel > 2**31
    flat = zerocomm.flatten([small, big], layout=layout)
    assert torch.equal(flat[layout.offsets[0] : layout.offsets[0] + 777], small)
    assert torch.equal(flat[layout.offsets[1] : layout.offsets[1] + n], big)
    back_small, back_big = torch.zeros_like(small), torch.zeros_like(big)
    zerocomm.unflatten(flat, [back_small, back_big], layout=layout)
    assert torch.equal(back_small, small) and torch.equal(back_big, big)
    del big, flat, back_big
    torch.cuda.empty_cache()


DEBUG_DELAY_S = 0.5


def test_debug_delay_on_cuda_overlaps_nccl_sync(nccl_world1: None) -> None:
    """zerocomm's own NCCL communicator at world size 1 with the CUDA debug
    delay (the spin kernel on the comm stream before each bucket): the
    forward after the step waits on the GPU, not on the host, and reads the
    synced parameters. Negative control: the compute stream is still busy
    right after the forward was issued (it waits behind the delay)."""
    import zerocomm

    model = _model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    zopt = zerocomm.attach(model, opt, mode="allgather", bucket_mb=0.01)
    assert zopt.units[0].sched.transport == "nccl"
    x = _batch(0, torch.float32)
    model(x).square().mean().backward()
    zopt.step()
    zopt.zero_grad()
    zopt.synchronize()
    torch.cuda.synchronize()
    for u in zopt.units:
        u.sched.set_debug_delay(DEBUG_DELAY_S)
    model(x).square().mean().backward()
    zopt.step()  # launches: each bucket first spins DEBUG_DELAY_S on the comm stream
    t0 = time.perf_counter()
    out = model(x)
    host_s = time.perf_counter() - t0
    busy = not torch.cuda.current_stream().query()
    zopt.synchronize()
    torch.cuda.synchronize()
    for u in zopt.units:
        u.sched.set_debug_delay(0.0)
    torch.testing.assert_close(out, model(x), atol=0, rtol=0)
    assert busy, "the forward did not wait for the delayed sync on the GPU"
    assert host_s < DEBUG_DELAY_S / 2, f"the forward blocked the host for {host_s:.3f} s"
    zopt.close()


def test_cuda_graph_capture_is_refused(nccl_world1: None) -> None:
    """Capturing zerocomm's hooks into a CUDA graph is a clear error, and the
    handle keeps working afterwards ([Note: no CUDA graph capture])."""
    import zerocomm

    model = _model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    zopt = zerocomm.attach(model, opt, mode="broadcast", bucket_mb=0.01)
    x = _batch(0, torch.float32)
    model(x).square().mean().backward()
    zopt.step()  # the next forward's hooks wait for this sync
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(graph):
            model(x)
    zopt.synchronize()
    zopt.zero_grad()
    model(x).square().mean().backward()  # eager use still works
    zopt.step()
    zopt.synchronize()
    zopt.close()
