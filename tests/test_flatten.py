"""Tests for zerocomm.flatten / unflatten / FlatLayout.

CPU tests always run (they are the contract on machines without a GPU); the
CUDA tests at the end skip without one. Equality is bitwise throughout: the
tensors hold random bytes (NaN and denormal patterns included) and are
compared through a uint8 view, so a copy that goes through a float register
or converts dtypes would be caught.
"""

from __future__ import annotations

import random

import pytest
import torch

import zerocomm
from zerocomm import FlatLayout

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8]
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


# ------------------------------------------------------------------ helpers


def rand_bytes_tensor(shape, dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """A tensor of `shape` whose bytes are uniformly random (any bit pattern)."""
    numel = 1
    for s in shape:
        numel *= s
    elem = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * elem,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).to(device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view: uint8 bytes of a contiguous tensor (0-d and empty included)."""
    return t.reshape(-1).view(torch.uint8)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def random_shapes(rng: random.Random, n: int, max_dim: int = 3, max_side: int = 9):
    shapes = []
    for _ in range(n):
        nd = rng.randint(0, max_dim)  # 0 -> a 0-d (scalar) tensor
        shapes.append(
            tuple(rng.randint(0, max_side) if rng.random() < 0.1 else rng.randint(1, max_side) for _ in range(nd))
        )
    return shapes


def elem_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def covered_mask(layout: FlatLayout, n: int, device="cpu") -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    for off, num in zip(layout.offsets, layout.numels):
        mask[off : off + num] = True
    return mask


def check_layout(layout: FlatLayout, tensors, align_bytes: int, pad_to: int = 1) -> None:
    """Offsets aligned, packed as tightly as the alignment allows, slots disjoint."""
    assert len(layout) == len(tensors)
    assert list(layout.numels) == [t.numel() for t in tensors]
    assert layout.align_bytes == align_bytes
    if not tensors:
        assert layout.total_numel == 0
        return
    elem = tensors[0].element_size()
    step = max(1, align_bytes // elem)
    cursor = 0
    for i, (off, num) in enumerate(zip(layout.offsets, layout.numels)):
        assert (off * elem) % align_bytes == 0, f"slot {i} at element {off} is not {align_bytes}-byte aligned"
        assert off == round_up(cursor, step), f"slot {i}: offset {off}, expected {round_up(cursor, step)}"
        cursor = off + num
    assert layout.total_numel == round_up(cursor, pad_to)
    assert layout.total_numel % pad_to == 0


def check_flat(flat: torch.Tensor, tensors, layout: FlatLayout, padding_zero: bool = True) -> None:
    assert flat.dim() == 1
    assert flat.numel() >= layout.total_numel
    if tensors:
        assert flat.dtype == tensors[0].dtype
    for i, (t, off, num) in enumerate(zip(tensors, layout.offsets, layout.numels)):
        assert bit_equal(flat[off : off + num], t.reshape(-1)), f"slot {i} differs"
    if padding_zero:
        pad = as_bytes(flat[~covered_mask(layout, flat.numel(), flat.device)])
        assert int(pad.count_nonzero()) == 0, "padding is not zero"


def roundtrip(tensors, align_bytes: int = 16) -> torch.Tensor:
    """flatten -> check -> unflatten into fresh targets -> check; returns flat."""
    layout = FlatLayout(tensors, align_bytes=align_bytes)
    check_layout(layout, tensors, align_bytes)
    flat = zerocomm.flatten(tensors, align_bytes=align_bytes)
    assert flat.numel() == layout.total_numel
    check_flat(flat, tensors, layout)
    # Same flat buffer when the layout is passed in.
    assert bit_equal(zerocomm.flatten(tensors, layout=layout), flat)

    targets = [torch.full_like(t, 7) for t in tensors]
    zerocomm.unflatten(flat, targets, align_bytes=align_bytes)
    for i, (t, u) in enumerate(zip(tensors, targets)):
        assert bit_equal(u, t), f"tensor {i} differs after unflatten"
    targets2 = [torch.zeros_like(t) for t in tensors]
    zerocomm.unflatten(flat, targets2, layout=layout)
    for i, (t, u) in enumerate(zip(tensors, targets2)):
        assert bit_equal(u, t), f"tensor {i} differs after unflatten(layout=)"
    return flat


# ------------------------------------------------------------------ CPU: round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roundtrip_random_shapes(dtype, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = random_shapes(rng, rng.randint(1, 40))
    tensors = [rand_bytes_tensor(s, dtype, gen) for s in shapes]
    roundtrip(tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_roundtrip_1000_tensors(dtype):
    rng = random.Random(1000)
    gen = torch.Generator().manual_seed(1000)
    tensors = [rand_bytes_tensor((rng.randint(0, 300),), dtype, gen) for _ in range(1000)]
    tensors[17] = rand_bytes_tensor((), dtype, gen)
    roundtrip(tensors)


def test_roundtrip_empty_and_zero_dim():
    gen = torch.Generator().manual_seed(5)
    tensors = [
        rand_bytes_tensor((0,), torch.float32, gen),
        rand_bytes_tensor((), torch.float32, gen),
        rand_bytes_tensor((3, 0, 2), torch.float32, gen),
        rand_bytes_tensor((5,), torch.float32, gen),
        rand_bytes_tensor((0,), torch.float32, gen),
        rand_bytes_tensor((), torch.float32, gen),
        rand_bytes_tensor((0,), torch.float32, gen),
    ]
    flat = roundtrip(tensors)
    layout = FlatLayout(tensors)
    assert list(layout.numels) == [0, 1, 0, 5, 0, 1, 0]
    # 0-d tensors come back 0-d.
    targets = [torch.zeros_like(t) for t in tensors]
    zerocomm.unflatten(flat, targets)
    assert targets[1].dim() == 0 and targets[5].dim() == 0


def test_only_empty_tensors_and_empty_list():
    tensors = [torch.empty(0), torch.empty(0, 4), torch.empty(0)]
    flat = zerocomm.flatten(tensors)
    assert flat.numel() == FlatLayout(tensors).total_numel == 0
    zerocomm.unflatten(flat, tensors)

    flat = zerocomm.flatten([])
    assert flat.dim() == 1 and flat.numel() == 0
    layout = FlatLayout([])
    assert len(layout) == 0 and layout.total_numel == 0
    zerocomm.unflatten(flat, [])
    zerocomm.unflatten(torch.empty(4), [])


def test_roundtrip_crosses_cpu_parallel_chunks():
    """Many threads and a buffer of several MB: the CPU loop splits by bytes,
    so pieces start and end inside tensors and around empty ones."""
    gen = torch.Generator().manual_seed(9)
    rng = random.Random(9)
    sizes = []
    for _ in range(60):
        r = rng.random()
        sizes.append(0 if r < 0.15 else rng.randint(1, 7) if r < 0.4 else rng.randint(1000, 120_000))
    tensors = [rand_bytes_tensor((n,), torch.float32, gen) for n in sizes]
    old = torch.get_num_threads()
    try:
        for threads in (1, 3, 7):
            torch.set_num_threads(threads)
            roundtrip(tensors, align_bytes=64)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize(
    "sizes",
    [
        [3_000_001, 5_123_457, 1, 777_777],  # few big pieces: one parallel team, streaming stores
        [4096 + 13 * (i % 7) for i in range(2300)],  # many small ones over 8 MiB: streaming, one thread
        [300_001, 0, 262_147, 5],  # just over the parallel threshold, under the streaming one
    ],
    ids=["big", "many_small", "mid"],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_copies_misaligned(sizes, threads):
    """The CPU copy's big-copy paths ([Note: CPU copy threading], [Note:
    streaming stores] in csrc/cpu_copy.cpp): byte sizes that are no multiple
    of 16 or 64 and targets at odd addresses, so every piece has a head and
    tail around its aligned body; nothing outside the targets is written."""
    gen = torch.Generator().manual_seed(len(sizes) * 31 + threads)
    total = sum(sizes)
    src_buf = rand_bytes_tensor((total + 3 * len(sizes) + 64,), torch.uint8, gen)
    starts, cursor = [], 1
    for n in sizes:
        starts.append(cursor)
        cursor += n + 3  # odd gaps: every view starts at an odd address
    src = [src_buf[s : s + n] for s, n in zip(starts, sizes)]
    dst_buf = torch.zeros_like(src_buf)
    dst = [dst_buf[s : s + n] for s, n in zip(starts, sizes)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        layout = FlatLayout(src, align_bytes=1)
        flat = torch.empty(layout.total_numel + 5, dtype=torch.uint8)[5:]  # odd flat base too
        zerocomm.flatten(src, out=flat, layout=layout)
        assert bit_equal(flat, torch.cat(src))
        zerocomm.unflatten(flat, dst, layout=layout)
    finally:
        torch.set_num_threads(old)
    mask = torch.zeros(dst_buf.numel(), dtype=torch.bool)
    for s, n, a, b in zip(starts, sizes, src, dst):
        assert bit_equal(a, b)
        mask[s : s + n] = True
    assert int(dst_buf[~mask].count_nonzero()) == 0, "unflatten wrote outside its targets"


# ------------------------------------------------------------------ CPU: layout


@pytest.mark.parametrize("align_bytes", [1, 2, 4, 8, 16, 32, 64, 256, 4096])
@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.float16, torch.float32, torch.int64], ids=["uint8", "float16", "float32", "int64"]
)
def test_offsets_aligned(align_bytes, dtype):
    rng = random.Random(align_bytes)
    gen = torch.Generator().manual_seed(align_bytes)
    tensors = [rand_bytes_tensor(s, dtype, gen) for s in random_shapes(rng, 25)]
    layout = FlatLayout(tensors, align_bytes=align_bytes)
    check_layout(layout, tensors, align_bytes)
    flat = zerocomm.flatten(tensors, align_bytes=align_bytes)
    check_flat(flat, tensors, layout)


def test_layout_attributes():
    tensors = [torch.ones(3), torch.ones(5), torch.ones(0), torch.tensor(2.0), torch.ones(2, 2)]
    layout = FlatLayout(tensors, align_bytes=16)
    assert list(layout.offsets) == [0, 4, 12, 12, 16]
    assert list(layout.numels) == [3, 5, 0, 1, 4]
    assert layout.total_numel == 20
    assert layout.align_bytes == 16
    assert len(layout) == 5
    assert "FlatLayout" in repr(layout)

    padded = FlatLayout(tensors, align_bytes=16, pad_to=8)
    assert list(padded.offsets) == list(layout.offsets)
    assert padded.total_numel == 24


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layout_dtype(dtype):
    layout = FlatLayout([torch.zeros(3, dtype=dtype), torch.zeros(2, dtype=dtype)])
    # torch dtypes are singletons: `==` is identity, so a dtype object that is
    # merely equivalent would break every `t.dtype == layout.dtype` check.
    assert layout.dtype == dtype
    assert layout.dtype is dtype


@pytest.mark.parametrize("pad_to", [1, 2, 7, 64, 1000])
def test_pad_to(pad_to):
    gen = torch.Generator().manual_seed(pad_to)
    tensors = [rand_bytes_tensor((n,), torch.float32, gen) for n in (5, 1, 33, 0, 12)]
    layout = FlatLayout(tensors, align_bytes=16, pad_to=pad_to)
    check_layout(layout, tensors, 16, pad_to)
    flat = zerocomm.flatten(tensors, layout=layout)
    assert flat.numel() == layout.total_numel
    check_flat(flat, tensors, layout)  # padding, the tail included, is zero


def test_padding_is_zero_even_when_memory_was_dirty():
    # Fill the allocator's free lists with non-zero bytes first: the allocated
    # flat buffer must still have zero padding (it travels through collectives).
    for _ in range(4):
        junk = torch.full((4096,), -1.0)
        del junk
    gen = torch.Generator().manual_seed(3)
    tensors = [rand_bytes_tensor((n,), torch.uint8, gen) for n in (1, 2, 3, 17, 100, 1)]
    layout = FlatLayout(tensors, align_bytes=64)
    flat = zerocomm.flatten(tensors, layout=layout)
    check_flat(flat, tensors, layout)


def test_matches_torch_cat():
    gen = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    tensors = [rand_bytes_tensor(s, torch.float32, gen) for s in random_shapes(rng, 50)]
    cat = torch.cat([t.reshape(-1) for t in tensors])

    layout = FlatLayout(tensors, align_bytes=64)
    flat = zerocomm.flatten(tensors, layout=layout)
    idx = torch.cat([torch.arange(o, o + n) for o, n in zip(layout.offsets, layout.numels)])
    assert bit_equal(flat[idx], cat)

    # Alignment of one element: no padding at all, so the flat buffer IS torch.cat.
    packed = zerocomm.flatten(tensors, align_bytes=4)
    assert bit_equal(packed, cat)
    assert bit_equal(packed, torch._utils._flatten_dense_tensors(tensors))


# ------------------------------------------------------------------ CPU: out= and views


def test_out_reuse_with_precomputed_layout():
    gen = torch.Generator().manual_seed(21)
    tensors = [rand_bytes_tensor((n,), torch.bfloat16, gen) for n in (7, 0, 64, 3, 129)]
    layout = FlatLayout(tensors, align_bytes=32, pad_to=4)
    out = torch.zeros(layout.total_numel, dtype=torch.bfloat16)
    ptr = out.data_ptr()
    for step in range(3):
        for t in tensors:
            t.copy_(rand_bytes_tensor(t.shape, t.dtype, gen))
        res = zerocomm.flatten(tensors, out=out, layout=layout)
        assert res.data_ptr() == ptr and res.numel() == out.numel()
        check_flat(out, tensors, layout)
        targets = [torch.empty_like(t) for t in tensors]
        zerocomm.unflatten(out, targets, layout=layout)
        assert all(bit_equal(a, b) for a, b in zip(targets, tensors)), f"step {step}"


def test_out_larger_than_needed_and_offset_view():
    """`out` may be a slice of a bigger buffer: only its slots are written."""
    gen = torch.Generator().manual_seed(22)
    tensors = [rand_bytes_tensor((n,), torch.float32, gen) for n in (3, 9, 1, 40)]
    layout = FlatLayout(tensors)
    big = torch.full((layout.total_numel + 20,), 5.0)
    out = big[3 : 3 + layout.total_numel + 10]  # storage offset 3 elements, and too long
    zerocomm.flatten(tensors, out=out, layout=layout)
    for i, (t, off, num) in enumerate(zip(tensors, layout.offsets, layout.numels)):
        assert bit_equal(out[off : off + num], t), f"slot {i}"
    assert torch.equal(big[:3], torch.full((3,), 5.0))
    assert torch.equal(out[layout.total_numel :], torch.full((10,), 5.0))
    assert torch.equal(big[3 + layout.total_numel + 10 :], torch.full((7,), 5.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64], ids=["float32", "uint8", "int64"])
def test_misaligned_views_cpu(dtype):
    """Contiguous views starting at odd element offsets, as sources and targets."""
    gen = torch.Generator().manual_seed(23)
    src_buf = rand_bytes_tensor((5000,), dtype, gen)
    sizes = [1, 13, 255, 1024, 3]
    starts = [1, 17, 301, 1999, 4001]
    src = [src_buf[s : s + n] for s, n in zip(starts, sizes)]
    flat = roundtrip(src)

    dst_buf = torch.zeros(5000, dtype=dtype)
    dst = [dst_buf[s + 2 : s + 2 + n] for s, n in zip(starts, sizes)]
    zerocomm.unflatten(flat, dst)
    mask = torch.zeros(5000, dtype=torch.bool)
    for s, n, a, b in zip(starts, sizes, src, dst):
        assert bit_equal(a, b)
        mask[s + 2 : s + 2 + n] = True
    assert int(as_bytes(dst_buf[~mask]).count_nonzero()) == 0, "unflatten wrote outside its targets"


def test_unflatten_targets_are_written_in_place():
    tensors = [torch.zeros(4), torch.zeros(2, 3)]
    ptrs = [t.data_ptr() for t in tensors]
    flat = zerocomm.flatten([torch.arange(4.0), torch.arange(6.0).reshape(2, 3)])
    zerocomm.unflatten(flat, tensors)
    assert [t.data_ptr() for t in tensors] == ptrs
    assert torch.equal(tensors[0], torch.arange(4.0))
    assert torch.equal(tensors[1], torch.arange(6.0).reshape(2, 3))


def test_tensors_that_are_views_of_the_flat_buffer():
    """Zero-copy use: parameters live as views into the flat buffer, so
    flatten/unflatten copy every slot onto itself and must leave it intact."""
    gen = torch.Generator().manual_seed(24)
    src = [rand_bytes_tensor((n,), torch.float32, gen) for n in (5, 0, 300_000, 7, 64)]
    layout = FlatLayout(src)
    flat = zerocomm.flatten(src, layout=layout)
    expected = flat.clone()
    views = [flat[o : o + n] for o, n in zip(layout.offsets, layout.numels)]
    assert zerocomm.flatten(views, out=flat, layout=layout).data_ptr() == flat.data_ptr()
    assert bit_equal(flat, expected)
    zerocomm.unflatten(flat, views, layout=layout)
    assert bit_equal(flat, expected)


def test_accepts_any_sequence():
    ts = [torch.ones(3), torch.full((2,), 2.0)]
    a = zerocomm.flatten(ts)
    assert torch.equal(zerocomm.flatten(tuple(ts)), a)
    assert torch.equal(zerocomm.flatten(t for t in ts), a)


# ------------------------------------------------------------------ CPU: errors


def test_error_mixed_dtypes():
    ts = [torch.zeros(3), torch.zeros(2), torch.zeros(4, dtype=torch.float16), torch.zeros(1)]
    with pytest.raises(TypeError, match=r"tensor 2 has dtype Half.*tensor 0 has Float"):
        zerocomm.flatten(ts)
    with pytest.raises(TypeError, match=r"tensor 2 has dtype"):
        FlatLayout(ts)
    with pytest.raises(TypeError, match=r"tensor 2 has dtype"):
        zerocomm.unflatten(torch.zeros(64), ts)


def test_error_dtype_differs_from_out_or_flat():
    ts = [torch.zeros(3), torch.zeros(2)]
    layout = FlatLayout(ts)
    with pytest.raises(TypeError, match=r"flatten: tensor 0 has dtype Float but the flat buffer has Half"):
        zerocomm.flatten(ts, out=torch.zeros(16, dtype=torch.float16), layout=layout)
    with pytest.raises(TypeError, match=r"unflatten: tensor 0 has dtype Float but the flat buffer has Int"):
        zerocomm.unflatten(torch.zeros(16, dtype=torch.int32), ts, layout=layout)


def test_error_non_contiguous():
    ts = [torch.zeros(3), torch.zeros(2), torch.zeros(2), torch.zeros(4, 4).t()]
    with pytest.raises(ValueError, match=r"flatten: tensor 3 is not contiguous"):
        zerocomm.flatten(ts)
    with pytest.raises(ValueError, match=r"unflatten: tensor 3 is not contiguous"):
        zerocomm.unflatten(torch.zeros(64), ts)
    strided = [torch.zeros(3), torch.zeros(10)[::2]]
    with pytest.raises(ValueError, match=r"flatten: tensor 1 is not contiguous"):
        zerocomm.flatten(strided)


def test_error_non_contiguous_flat_buffer():
    ts = [torch.zeros(3)]
    with pytest.raises(ValueError, match=r"flat buffer must be contiguous"):
        zerocomm.flatten(ts, out=torch.zeros(16)[::2])
    with pytest.raises(ValueError, match=r"flat buffer must be contiguous"):
        zerocomm.unflatten(torch.zeros(16)[::2], ts)


def test_error_other_device():
    # 'meta' stands in for a second device on CPU-only machines.
    ts = [torch.zeros(3), torch.zeros(2), torch.zeros(5, device="meta")]
    with pytest.raises(ValueError, match=r"flatten: tensor 2 is on meta but the flat buffer is on cpu"):
        zerocomm.flatten(ts)
    with pytest.raises(ValueError, match=r"unflatten: tensor 2 is on meta"):
        zerocomm.unflatten(torch.zeros(64), ts)


def test_error_out_too_small():
    ts = [torch.zeros(3), torch.zeros(5)]
    layout = FlatLayout(ts)  # offsets 0, 4 -> 9 elements
    assert layout.total_numel == 9
    with pytest.raises(ValueError, match=r"the flat buffer has 8 elements but the layout needs 9"):
        zerocomm.flatten(ts, out=torch.zeros(8), layout=layout)
    with pytest.raises(ValueError, match=r"the flat buffer has 8 elements but the layout needs 9"):
        zerocomm.flatten(ts, out=torch.zeros(8))
    with pytest.raises(ValueError, match=r"unflatten: the flat buffer has 4 elements but the layout needs 9"):
        zerocomm.unflatten(torch.zeros(4), ts)


def test_error_count_differs_from_layout():
    layout = FlatLayout([torch.zeros(3), torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"flatten: got 2 tensors but the layout has 3 slots"):
        zerocomm.flatten([torch.zeros(3), torch.zeros(3)], layout=layout)
    with pytest.raises(ValueError, match=r"unflatten: got 4 tensors but the layout has 3 slots"):
        zerocomm.unflatten(torch.zeros(64), [torch.zeros(3)] * 4, layout=layout)


def test_error_numel_differs_from_layout():
    layout = FlatLayout([torch.zeros(3), torch.zeros(4), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"flatten: tensor 1 has 5 elements but its slot has 4"):
        zerocomm.flatten([torch.zeros(3), torch.zeros(5), torch.zeros(3)], layout=layout)
    with pytest.raises(ValueError, match=r"unflatten: tensor 2 has 2 elements but its slot has 3"):
        zerocomm.unflatten(torch.zeros(64), [torch.zeros(3), torch.zeros(4), torch.zeros(2)], layout=layout)


def test_error_not_a_tensor():
    with pytest.raises(TypeError, match=r"tensor 1 is a int, not a torch.Tensor"):
        zerocomm.flatten([torch.zeros(3), 5, torch.zeros(2)])
    with pytest.raises(TypeError, match=r"tensor 2 is a list"):
        zerocomm.unflatten(torch.zeros(8), [torch.zeros(3), torch.zeros(2), [1.0]])
    with pytest.raises(TypeError, match=r"tensor 0 is a NoneType"):
        zerocomm.flatten([None])
    with pytest.raises(TypeError, match=r"single tensor"):
        zerocomm.flatten(torch.zeros(3))
    with pytest.raises(TypeError, match=r"single tensor"):
        zerocomm.unflatten(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("align_bytes", [0, -16, 3, 24])
def test_error_bad_align_bytes(align_bytes):
    with pytest.raises(ValueError, match=rf"align_bytes must be a positive power of two, got {align_bytes}"):
        FlatLayout([torch.zeros(3)], align_bytes=align_bytes)
    with pytest.raises(ValueError, match=r"align_bytes"):
        zerocomm.flatten([torch.zeros(3)], align_bytes=align_bytes)


def test_error_bad_pad_to():
    with pytest.raises(ValueError, match=r"pad_to must be >= 1, got 0"):
        FlatLayout([torch.zeros(3)], pad_to=0)


def test_error_leaves_out_untouched():
    """Validation runs before any byte is copied."""
    ts = [torch.ones(3), torch.ones(4), torch.ones(4, 4).t()]
    layout = FlatLayout([t.contiguous() for t in ts])
    out = torch.full((layout.total_numel,), 9.0)
    with pytest.raises(ValueError, match=r"tensor 2 is not contiguous"):
        zerocomm.flatten(ts, out=out, layout=layout)
    assert torch.equal(out, torch.full_like(out, 9.0))

    targets = [torch.zeros(3), torch.zeros(4), torch.zeros(2)]
    with pytest.raises(ValueError, match=r"tensor 2 has 2 elements"):
        zerocomm.unflatten(torch.ones(layout.total_numel), targets, layout=layout)
    assert all(int(t.count_nonzero()) == 0 for t in targets)


# ------------------------------------------------------------------ CUDA


CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8]
CUDA_DTYPE_IDS = [str(d).replace("torch.", "") for d in CUDA_DTYPES]


def cuda_roundtrip(tensors, align_bytes: int = 16) -> torch.Tensor:
    """Round trip on CUDA, checked against the CPU result bitwise."""
    layout = FlatLayout(tensors, align_bytes=align_bytes)
    check_layout(layout, tensors, align_bytes)
    flat = zerocomm.flatten(tensors, layout=layout)
    assert flat.device == tensors[0].device
    torch.cuda.synchronize()
    cpu_tensors = [t.cpu() for t in tensors]
    flat_cpu = flat.cpu()
    check_flat(flat_cpu, cpu_tensors, layout)
    assert bit_equal(flat_cpu, zerocomm.flatten(cpu_tensors, layout=layout))

    targets = [torch.full_like(t, 3) for t in tensors]
    zerocomm.unflatten(flat, targets, layout=layout)
    torch.cuda.synchronize()
    for i, (t, u) in enumerate(zip(cpu_tensors, targets)):
        assert bit_equal(u.cpu(), t), f"tensor {i} differs after unflatten"
    return flat


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=CUDA_DTYPE_IDS)
def test_cuda_roundtrip(dtype):
    rng = random.Random(31)
    gen = torch.Generator().manual_seed(31)
    shapes = random_shapes(rng, 50) + [(0,), (), (70_000,), (3, 16_385)]
    tensors = [rand_bytes_tensor(s, dtype, gen, "cuda") for s in shapes]
    cuda_roundtrip(tensors)
    cuda_roundtrip(tensors, align_bytes=256)
    cuda_roundtrip(tensors, align_bytes=1)


@needs_cuda
def test_cuda_empty_inputs():
    flat = zerocomm.flatten([torch.empty(0, device="cuda"), torch.empty(0, 3, device="cuda")])
    assert flat.is_cuda and flat.numel() == 0
    zerocomm.unflatten(flat, [torch.empty(0, device="cuda"), torch.empty(0, 3, device="cuda")])
    zerocomm.unflatten(torch.zeros(4, device="cuda"), [])


@needs_cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int64], ids=["float32", "bfloat16", "uint8", "int64"]
)
def test_cuda_misaligned_views(dtype):
    """Contiguous views that start at odd element offsets (not 16-byte aligned),
    as sources, as unflatten targets and as the `out` buffer."""
    gen = torch.Generator().manual_seed(32)
    n_buf = 300_000
    src_buf = rand_bytes_tensor((n_buf,), dtype, gen, "cuda")
    sizes = [1, 3, 17, 4099, 70_001, 5]
    starts = [1, 7, 29, 1001, 100_003, 200_001]
    src = [src_buf[s : s + n] for s, n in zip(starts, sizes)]
    flat = cuda_roundtrip(src)

    dst_buf = torch.zeros(n_buf, dtype=dtype, device="cuda")
    dst = [dst_buf[s + 3 : s + 3 + n] for s, n in zip(starts, sizes)]
    zerocomm.unflatten(flat, dst)
    mask = torch.zeros(n_buf, dtype=torch.bool, device="cuda")
    for s, n, a, b in zip(starts, sizes, src, dst):
        assert bit_equal(a.cpu(), b.cpu())
        mask[s + 3 : s + 3 + n] = True
    assert int(as_bytes(dst_buf[~mask]).count_nonzero()) == 0, "unflatten wrote outside its targets"

    # Misaligned `out`: element offset 1 into a bigger buffer.
    layout = FlatLayout(src)
    big = torch.zeros(layout.total_numel + 2, dtype=dtype, device="cuda")
    out = big[1 : 1 + layout.total_numel]
    zerocomm.flatten(src, out=out, layout=layout)
    check_flat(out.cpu(), [t.cpu() for t in src], layout)
    assert int(as_bytes(big[:1]).count_nonzero()) == 0
    assert int(as_bytes(big[-1:]).count_nonzero()) == 0


@needs_cuda
def test_cuda_10000_small_tensors():
    rng = random.Random(33)
    gen = torch.Generator().manual_seed(33)
    sizes = [rng.randint(0, 64) for _ in range(10_000)]
    cpu = [rand_bytes_tensor((n,), torch.float32, gen) for n in sizes]
    tensors = [t.cuda() for t in cpu]
    layout = FlatLayout(tensors)
    flat = zerocomm.flatten(tensors, layout=layout)
    assert bit_equal(flat.cpu(), zerocomm.flatten(cpu, layout=layout))
    targets = [torch.empty_like(t) for t in tensors]
    zerocomm.unflatten(flat, targets, layout=layout)
    got = torch.cat([t.reshape(-1) for t in targets]).cpu()
    assert bit_equal(got, torch.cat(cpu))


@needs_cuda
def test_cuda_one_large_tensor():
    n = 64 * 1024 * 1024 // 4  # 64 MB of fp32
    gen = torch.Generator(device="cuda").manual_seed(34)
    big = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device="cuda", generator=gen).view(torch.float32)
    small = torch.arange(5, dtype=torch.float32, device="cuda")
    tensors = [small, big, small + 1]
    layout = FlatLayout(tensors)
    flat = zerocomm.flatten(tensors, layout=layout)
    o = layout.offsets
    assert torch.equal(flat[o[1] : o[1] + n].view(torch.int32), big.view(torch.int32))
    assert torch.equal(flat[o[0] : o[0] + 5], small) and torch.equal(flat[o[2] : o[2] + 5], small + 1)
    target = torch.zeros_like(big)
    zerocomm.unflatten(flat, [torch.zeros_like(small), target, torch.zeros_like(small)], layout=layout)
    assert torch.equal(target.view(torch.int32), big.view(torch.int32))


@needs_cuda
def test_cuda_tensors_that_are_views_of_the_flat_buffer():
    gen = torch.Generator().manual_seed(36)
    src = [rand_bytes_tensor((n,), torch.bfloat16, gen, "cuda") for n in (5, 0, 300_000, 7, 64)]
    layout = FlatLayout(src)
    flat = zerocomm.flatten(src, layout=layout)
    expected = flat.clone()
    views = [flat[o : o + n] for o, n in zip(layout.offsets, layout.numels)]
    zerocomm.flatten(views, out=flat, layout=layout)
    zerocomm.unflatten(flat, views, layout=layout)
    torch.cuda.synchronize()
    assert bit_equal(flat.cpu(), expected.cpu())


@needs_cuda
def test_cuda_runs_on_current_stream():
    """flatten/unflatten enqueue on the caller's current stream: work queued
    before them on a side stream (a long sleep, then a write) must be seen."""
    gen = torch.Generator().manual_seed(35)
    cpu = [rand_bytes_tensor((n,), torch.float32, gen) for n in (1000, 1, 70_000, 33)]
    layout = FlatLayout(cpu)
    expected_flat = zerocomm.flatten(cpu, layout=layout).cuda()
    flat = torch.zeros_like(expected_flat)
    targets = [torch.zeros(t.shape, device="cuda") for t in cpu]
    srcs = [torch.zeros(t.shape, device="cuda") for t in cpu]
    ready = [t.cuda() for t in cpu]
    side = torch.cuda.Stream()
    assert side != torch.cuda.current_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms: a kernel on the wrong stream would run first
        flat.copy_(expected_flat)
        zerocomm.unflatten(flat, targets, layout=layout)
        torch.cuda._sleep(20_000_000)
        for s, r in zip(srcs, ready):
            s.copy_(r)
        out = zerocomm.flatten(srcs, layout=layout)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for i, (t, u) in enumerate(zip(cpu, targets)):
        assert bit_equal(u.cpu(), t), f"tensor {i}: unflatten did not run after the side stream's write"
    assert bit_equal(out.cpu(), expected_flat.cpu())


@needs_cuda
def test_cuda_mixed_devices_error():
    with pytest.raises(ValueError, match=r"flatten: tensor 2 is on cpu but the flat buffer is on cuda"):
        zerocomm.flatten([torch.zeros(3, device="cuda"), torch.zeros(2, device="cuda"), torch.zeros(4)])
    with pytest.raises(ValueError, match=r"flatten: tensor 1 is on cuda:0 but the flat buffer is on cpu"):
        zerocomm.flatten([torch.zeros(3), torch.zeros(2, device="cuda:0")])
    with pytest.raises(ValueError, match=r"flatten: tensor 0 is on cpu but the flat buffer is on cuda"):
        zerocomm.flatten([torch.zeros(3)], out=torch.zeros(8, device="cuda"))
    with pytest.raises(ValueError, match=r"unflatten: tensor 1 is on cpu"):
        zerocomm.unflatten(torch.zeros(16, device="cuda"), [torch.zeros(3, device="cuda"), torch.zeros(3)])


@needs_cuda
@pytest.mark.skipif(CUDA and torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_two_devices_error():
    with pytest.raises(ValueError, match=r"tensor 1 is on cuda:1"):
        zerocomm.flatten([torch.zeros(3, device="cuda:0"), torch.zeros(3, device="cuda:1")])


@needs_cuda
@pytest.mark.skipif(zerocomm.build_info()["cuda"], reason="zerocomm was built with CUDA")
def test_cuda_tensor_without_cuda_build():
    with pytest.raises(ValueError, match=r"built without CUDA"):
        zerocomm.flatten([torch.zeros(3, device="cuda")])
