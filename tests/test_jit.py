"""cuqk._jit: the variant table, the dispatcher, the parameter layout and NVRTC builds (CPU)."""

from __future__ import annotations

import ctypes
import importlib
import re
import struct
import types

import numpy as np
import pytest

from conftest import requires_gpu

from cuqk import _jit
from cuqk.qk_norm_rope import HEAD_DIMS


def test_variant_names_and_expressions_are_unique():
    assert len({v.name for v in _jit.VARIANTS}) == len(_jit.VARIANTS)
    assert len({v.expression for v in _jit.VARIANTS}) == len(_jit.VARIANTS)
    for v in _jit.VARIANTS:
        kernel = "qk_norm_mrope_kernel" if v.is_mrope else "qk_norm_rope_kernel"
        # The 1-D kernel's last flags are STREAM_STORES, CHUNKS and HEAD_DIM.
        last = "" if v.is_mrope else rf", (true|false), (true|false), {v.head_dim}"
        flags = rf"<\w+, (true|false), \d+, \d+, (true|false), (true|false){last}>"
        assert re.fullmatch(kernel + flags, v.expression)


@pytest.mark.parametrize("dtype", list(_jit.DTYPES))
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("is_mrope", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary", ["full", "half"])
def test_every_head_dim_dispatches(dtype, is_neox, wide, is_mrope, aligned, packed, rotary):
    vec = _jit.wide_vec(dtype) if wide else 1
    for head_dim in HEAD_DIMS:
        lanes, units = _jit.lanes_and_units(head_dim, vec)
        assert lanes & (lanes - 1) == 0 and lanes <= 32
        assert lanes * units * 2 * vec >= head_dim
        rotary_dim = head_dim if rotary == "full" else head_dim // 2
        chunks = not aligned and _jit.chunks_fit(dtype, is_neox, vec, is_mrope, rotary_dim,
                                                 head_dim)
        variant = _jit.select_variant(dtype, is_neox, vec, units, is_mrope, aligned, packed,
                                      head_dim=head_dim, chunks=chunks)
        assert variant in _jit.VARIANTS and variant.max_units >= units
        assert variant.is_mrope == is_mrope
        # The scalar instances take any alignment; the wide ones come in both.
        assert variant.aligned == (aligned or vec == 1)
        # Unaligned 16-bit NeoX heads under full rotary move in chunks, up to the size of
        # the chunks instances' weight table.
        assert variant.chunks == (not aligned and wide and dtype != "float32" and is_neox
                                  and not is_mrope and rotary == "full"
                                  and head_dim <= _jit.CHUNKS_MAX_HEAD_DIM)
        # Packed addressing: wide aligned and chunked instances only; the others fall back.
        assert variant.packed == (packed and wide and (aligned or variant.chunks))
        # Packed chunks: an instance of the call's own head size where there is one.
        fixed = variant.chunks and variant.packed and head_dim in _jit.CHUNKS_PACKED_HEAD_DIMS
        assert variant.head_dim == (head_dim if fixed else 0)
        # The prefetching twin of a five-block instance: heads of 128 elements or more.
        assert variant.prefetch_next == (variant.five_blocks_per_sm and head_dim >= 128)


def test_selftest_head_dims_reach_every_variant():
    # The GPU selftest checks that its call for a variant dispatches to it.
    from cuqk.cli import _selftest_head_dim

    for v in _jit.VARIANTS:
        head_dim = _selftest_head_dim(v)
        units = _jit.lanes_and_units(head_dim, v.vec)[1]
        assert _jit.select_variant(v.dtype, v.is_neox, v.vec, units, v.is_mrope, v.aligned,
                                   v.packed, head_dim=head_dim, chunks=v.chunks) == v, v.name


def test_rotary_dim_reaching_sends_unaligned_calls_to_their_variant():
    # The selftest and the sanitizer's cases reach each realigning instance with it.
    for v in _jit.VARIANTS:
        if v.aligned:
            continue
        for head_dim in (64, 128, 256):
            rotary = _jit.rotary_dim_reaching(v, head_dim)
            fits = _jit.chunks_fit(v.dtype, v.is_neox, v.vec, v.is_mrope, rotary, head_dim)
            assert fits == v.chunks, v.name
            assert rotary == head_dim or not v.chunks


def test_narrow_variants_are_the_packed_ones_below_the_wide_vec():
    narrow = {(v.dtype, v.vec) for v in _jit.VARIANTS if v.narrow}
    assert narrow == {(d, vec) for d, vecs in _jit.NARROW_VECS.items() for vec in vecs}
    for v in _jit.VARIANTS:
        if v.narrow:
            assert v.max_units == 1 and v.aligned and _jit.narrow_vec(v.dtype, 64 * v.vec) == v.vec


def test_unsupported_key_lists_supported_values():
    with pytest.raises(ValueError, match="supported"):
        _jit.select_variant("float64", True, 2, 1, head_dim=64)


def test_param_struct_matches_kernel_source():
    """POINTER_FIELDS + STATIC_FIELDS mirror QkNormRopeParams field by field."""
    source = _jit.load_source("qk_norm_rope")
    body = re.search(r"struct QkNormRopeParams \{(.*?)\};", source, re.DOTALL).group(1)
    sub_fields = re.search(r"struct HeadStrides \{(.*?)\};", source, re.DOTALL).group(1)
    sub_names = re.findall(r"(\w+)[,;]", sub_fields)
    names, floats = [], []
    for decl in body.strip().split(";"):
        decl = decl.strip()
        if not decl:
            continue
        ctype, rest = decl.split(None, 1) if not decl.startswith("long long") else (
            "long long", decl[len("long long"):])
        for name in (n.strip() for n in rest.split(",")):
            if ctype == "HeadStrides":
                names += [f"{name.removesuffix('_strides')}_{s}" for s in sub_names]
            else:
                names.append(name)
                if ctype == "float":
                    floats.append(name)
    assert names == [*_jit.POINTER_FIELDS, *_jit.STATIC_FIELDS]
    assert tuple(floats) == _jit.FLOAT_FIELDS
    # The two floats fill one 8-byte slot, so every other field stays 8-byte aligned.
    first = names.index(floats[0])
    assert len(floats) == 2 and names.index(floats[1]) == first + 1
    assert _jit.PARAMS_SIZE == 8 * (len(names) - 1)


def test_kernel_constants_match_the_host():
    source = _jit.load_source("qk_norm_rope")
    for name in ("BLOCK_THREADS", "MROPE_ROW_FLOATS"):
        found = re.search(rf"constexpr int {name} = (\d+);", source)
        assert found and int(found.group(1)) == getattr(_jit, name), name
    found = re.search(r"constexpr int CHUNK_TABLE_UNITS = (\d+);", source)
    assert found and 16 * int(found.group(1)) == _jit.CHUNKS_MAX_HEAD_DIM


@pytest.mark.parametrize("divisor", [1, 2, 3, 5, 7, 12, 32, 40, 48, 56, 64, 96, 127, 129, 1000,
                                     65535, 65537, 2**20 + 7])
def test_fast_division_is_exact_below_2_31(divisor):
    magic, shift = _jit.fast_division(divisor)
    assert 0 < magic < 2**32
    rng = np.random.default_rng(divisor)
    near = [m * divisor + d for m in (0, 1, 2, (2**31 - 1) // divisor)
            for d in (-1, 0, 1, divisor - 1)]
    n = np.concatenate([rng.integers(0, 2**31, 200_000, dtype=np.uint64),
                        np.array([x for x in near if 0 <= x < 2**31], dtype=np.uint64),
                        np.array([2**31 - 1, 2**31 - 2, 0], dtype=np.uint64)])
    # The kernel multiplies in 64 bits: magic < 2**32 and n < 2**31 keep the product below 2**63.
    assert np.array_equal((n * np.uint64(magic)) >> np.uint64(shift), n // np.uint64(divisor))


@pytest.mark.parametrize("dtype", list(_jit.DTYPES))
def test_mrope_windows_fit_the_shared_buffer_for_every_geometry(dtype):
    """The tokens a window of mrope_rounds rounds of heads spans, times rotary_dim, fit
    MROPE_ROW_FLOATS: every head dim, both access widths, few and many heads per token."""
    for vec in (_jit.wide_vec(dtype), 1):
        for head_dim in HEAD_DIMS:
            lanes, _ = _jit.lanes_and_units(head_dim, vec)
            for num_heads in (2, 3, 5, 12, 32, 40, 64, 200):
                rounds = _jit.mrope_rounds(lanes, num_heads, head_dim)
                assert 1 <= rounds <= _jit.MROPE_MAX_ROUNDS
                window = rounds * _jit.BLOCK_THREADS // lanes
                # Tokens that window consecutive heads can span, from any first head.
                tokens = max((first + window - 1) // num_heads - first // num_heads + 1
                             for first in range(num_heads))
                assert tokens * head_dim <= _jit.MROPE_ROW_FLOATS, (head_dim, vec, num_heads)


def test_mrope_rounds_for_model_shapes():
    assert _jit.mrope_rounds(8, 32, 128) == 4  # Qwen2.5-VL-7B: 28 + 4 heads, D=128
    assert _jit.mrope_rounds(8, 40, 128) == 4  # Qwen3-VL-8B: 32 + 8 heads
    assert _jit.mrope_rounds(8, 2, 128) == 2  # one q and one k head: the window is the limit


def test_source_inlines_headers_so_the_cache_key_tracks_them(tmp_path, monkeypatch):
    for f in _jit.KERNEL_DIR.iterdir():
        (tmp_path / f.name).write_text(f.read_text())
    monkeypatch.setattr(_jit, "KERNEL_DIR", tmp_path)
    before = _jit.source_fingerprint("qk_norm_rope")
    assert '#include "common.cuh"' not in _jit.load_source("qk_norm_rope")
    with open(tmp_path / "common.cuh", "a") as f:
        f.write("\n// edited\n")
    assert _jit.source_fingerprint("qk_norm_rope") != before


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("variant", _jit.VARIANTS, ids=lambda v: v.name)
def test_nvrtc_compiles_every_variant(variant, arch):
    cubin = _jit.compile_offline(variant, arch)
    assert cubin[:4] == b"\x7fELF"


def test_cubin_resources_reads_the_register_count_and_local_memory():
    registers, local = _jit.cubin_resources(_jit.compile_offline(_jit.VARIANTS[0], "sm_90"))
    assert 16 <= registers <= 255 and local >= 0
    with pytest.raises(ValueError, match="nv.info"):
        _jit.cubin_resources(b"\x7fELF" + bytes(60))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_wide_packed_16bit_instances_fit_five_blocks_per_sm_without_spills(arch):
    # 5 blocks of 256 threads in 65,536 registers leave 48 per thread (allocated 8 at a time).
    # Spills cost more than the fifth block gains (H200), so none are allowed.
    five_block = [v for v in _jit.VARIANTS if v.five_blocks_per_sm]
    assert sorted((v.dtype, v.is_neox, v.prefetch_next) for v in five_block) == sorted(
        (dtype, is_neox, prefetch) for dtype in ("float16", "bfloat16")
        for is_neox in (True, False) for prefetch in (True, False))
    for variant in five_block:
        registers, local = _jit.cubin_resources(_jit.compile_offline(variant, arch))
        assert registers <= 48 and local == 0, (variant.name, registers, local)


def test_only_the_five_block_twin_without_the_prefetch_streams_its_stores():
    # The store hint is the twins' only compile-time difference; plain stores elsewhere.
    twins = [v for v in _jit.VARIANTS if v.five_blocks_per_sm and v.dtype == "bfloat16"]
    others = [v for v in _jit.VARIANTS if not v.five_blocks_per_sm and v.dtype == "bfloat16"
              and v.packed and not v.is_mrope]
    assert len(twins) == 4 and others
    for variant in twins + others:
        streams = b"st.global.cs" in _jit.compile_offline(variant, "sm_90", ptx=True)
        assert streams == (variant.five_blocks_per_sm and not variant.prefetch_next), variant.name


def test_first_launch_caps_the_grid_at_the_resident_blocks(monkeypatch):
    # The host side of a launch, with the driver calls replaced: the first launch resolves the
    # function and the grid once, later launches reuse them.
    op = importlib.import_module("cuqk.qk_norm_rope")  # the module: the package exports the op
    launches = []
    monkeypatch.setattr(_jit, "get_function", lambda variant, device, stream: 1234)
    monkeypatch.setattr(_jit, "resident_blocks", lambda variant, device: 528)
    monkeypatch.setattr(_jit, "launch", lambda *args: launches.append(args[:3]))
    plans = [op._Plan("torch", 0, _jit.VARIANTS[0], blocks, b"", 0, (), None,
                      lambda device: 7, [], ()) for blocks in (10_000, 3)]
    for plan in plans:
        op._launch(plan, ())
        op._launch(plan, ())
    assert launches == [(1234, 528, 7)] * 2 + [(1234, 3, 7)] * 2


def _one_variant_per_kernel_path():
    """A general, a realigning, a scalar, a narrow, a five-block and an mRoPE instance."""
    picks = {}
    for v in _jit.VARIANTS:
        if v.dtype == "bfloat16" and v.is_neox:
            kind = ("mrope" if v.is_mrope else "narrow" if v.narrow else
                    "five" if v.five_blocks_per_sm else "scalar" if v.vec == 1 else
                    "realign" if not v.aligned else "general")
            picks.setdefault(kind, v)
    assert len(picks) == 6
    return list(picks.values())


@pytest.mark.parametrize("variant", _one_variant_per_kernel_path(), ids=lambda v: v.name)
def test_kernels_wait_for_the_prior_grid_from_sm90_on(variant):
    # PDL launches are only safe if the kernel waits before its first global access; sm_80
    # has no griddepcontrol and its launches stay plain.
    for arch, expected in (("sm_80", False), ("sm_90", True)):
        ptx = _jit.compile_offline(variant, arch, ptx=True)
        assert (b"griddepcontrol.wait" in ptx) == expected, (variant.name, arch)
        assert (b"griddepcontrol.launch_dependents" in ptx) == expected, (variant.name, arch)


def test_only_the_prefetching_five_block_twins_prefetch_before_the_wait():
    # Their first head goes to the L2 while the prior grid may still run; a load before the
    # wait would be a race, so only prefetches may come first, and only in those twins.
    for variant in _one_variant_per_kernel_path() + [
            v for v in _jit.VARIANTS if v.five_blocks_per_sm and v.dtype == "bfloat16"]:
        ptx = _jit.compile_offline(variant, "sm_90", ptx=True).decode()
        before = ptx[ptx.index(".entry"):ptx.index("griddepcontrol.wait")]
        assert ("prefetch.global.L2" in before) == variant.prefetch_next, variant.name
        assert not re.search(r"\b(ld|st)\.global", before), variant.name


@pytest.mark.parametrize("pdl_device", [True, False])
@pytest.mark.parametrize("enabled", [True, False])
def test_launch_asks_for_pdl_only_on_capable_devices_when_enabled(monkeypatch, pdl_device,
                                                                  enabled):
    # The driver call replaced: what cuLaunchKernelEx would be given.
    seen = []

    def fake_launch(config, func, argv, extra):
        raw = ctypes.string_at(config, _jit._CONFIG.size)
        seen.append((_jit._CONFIG.unpack(raw), func, argv, extra))
        return 201 if len(seen) == 1 else 0  # the first launch finds no context bound

    contexts = []
    monkeypatch.setattr(_jit, "_launch_function", fake_launch)
    monkeypatch.setattr(_jit, "runtime", types.SimpleNamespace(
        getDevice=lambda: 3, setDevice=contexts.append))
    monkeypatch.setattr(_jit, "_pdl_devices", {3} if pdl_device else set())
    previous = _jit.set_pdl(enabled)
    try:
        _jit.launch(77, 528, 0xABC, 3, range(len(_jit.POINTER_FIELDS)),
                    bytes(_jit._STATICS.size))
        assert _jit.pdl_enabled() == enabled
    finally:
        assert _jit.set_pdl(previous) == enabled
    assert contexts == [3] and len(seen) == 2 and seen[0] == seen[1]
    (grid_x, grid_y, grid_z, block_x, block_y, block_z, shared, stream, attrs, count), func, \
        argv, extra = seen[0]
    assert (grid_x, grid_y, grid_z, block_x, block_y, block_z, shared) == (
        528, 1, 1, _jit.BLOCK_THREADS, 1, 1, 0)
    assert (stream, func, argv, extra) == (0xABC, 77, _jit._buffers.argv_addr, None)
    assert count == (pdl_device and enabled)
    assert attrs == _jit._buffers.attribute_addr
    # CUlaunchAttribute: the id, 4 bytes of padding, then the value union (72 bytes in all).
    attribute = ctypes.string_at(attrs, 72)
    assert attribute == struct.pack("<I4xi60x", 6, 1)
    assert _jit._CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION == 6


def test_launch_raises_the_driver_error(monkeypatch):
    monkeypatch.setattr(_jit, "_launch_function", lambda *args: 700)
    monkeypatch.setattr(_jit, "runtime", types.SimpleNamespace(getDevice=lambda: 0))
    monkeypatch.setattr(_jit.driver, "CUDADriverError", lambda status: ValueError(status))
    with pytest.raises(ValueError, match="700"):
        _jit.launch(1, 1, 0, 0, range(len(_jit.POINTER_FIELDS)), bytes(_jit._STATICS.size))


def test_a_driver_without_cuLaunchKernelEx_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(_jit.ctypes, "CDLL", lambda name: types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="cuLaunchKernelEx.*11.8"):
        _jit._load_launch_function()


@requires_gpu
@pytest.mark.parametrize("tokens", [3, 4096])
def test_chained_calls_under_pdl_match_serial_launches(tokens):
    # Each in-place call reads what the one before it wrote, with a torch kernel in between
    # (not launched with PDL): under PDL, in eager mode and in a CUDA graph, every result must
    # be bit for bit that of plain launches. A kernel that read before the prior grid finished
    # would see stale heads.
    import torch

    import cuqk

    hq, hk, hv, d = 32, 8, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    start = torch.randn(tokens, (hq + hk + hv) * d, device="cuda", dtype=torch.bfloat16,
                        generator=gen)
    positions = torch.randint(0, 4096, (tokens,), device="cuda", generator=gen)
    weight = (1 + 0.1 * torch.randn(d, device="cuda", generator=gen)).to(torch.bfloat16)
    cache = torch.from_numpy(cuqk.rope_cos_sin_cache(4096, d)).cuda()

    def chain(qkv):
        for step in range(6):
            cuqk.qk_norm_rope_(qkv, positions, weight, weight, cache, num_q_heads=hq,
                               num_kv_heads=hk, head_dim=d)
            if step == 2:
                qkv[:, :d].mul_(3.0)
        return qkv

    previous = cuqk.set_pdl(False)
    try:
        expected = chain(start.clone())
        cuqk.set_pdl(True)
        eager = chain(start.clone())
        qkv = start.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(qkv)
        for _ in range(3):
            qkv.copy_(start)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(qkv, expected)
    finally:
        cuqk.set_pdl(previous)
    assert torch.equal(eager, expected)
