"""cuqk._jit: the variant table, the dispatcher, the parameter layout and NVRTC builds (CPU)."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest

from cuqk import _jit
from cuqk.qk_norm_rope import HEAD_DIMS


def test_variant_names_and_expressions_are_unique():
    assert len({v.name for v in _jit.VARIANTS}) == len(_jit.VARIANTS)
    assert len({v.expression for v in _jit.VARIANTS}) == len(_jit.VARIANTS)
    for v in _jit.VARIANTS:
        kernel = "qk_norm_mrope_kernel" if v.is_mrope else "qk_norm_rope_kernel"
        # The 1-D kernel's last flag is STREAM_STORES.
        last = "" if v.is_mrope else ", (true|false)"
        flags = rf"<\w+, (true|false), \d+, \d+, (true|false), (true|false){last}>"
        assert re.fullmatch(kernel + flags, v.expression)


@pytest.mark.parametrize("dtype", list(_jit.DTYPES))
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("is_mrope", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_every_head_dim_dispatches(dtype, is_neox, wide, is_mrope, aligned, packed):
    vec = _jit.wide_vec(dtype) if wide else 1
    for head_dim in HEAD_DIMS:
        lanes, units = _jit.lanes_and_units(head_dim, vec)
        assert lanes & (lanes - 1) == 0 and lanes <= 32
        assert lanes * units * 2 * vec >= head_dim
        variant = _jit.select_variant(dtype, is_neox, vec, units, is_mrope, aligned, packed,
                                      head_dim=head_dim)
        assert variant in _jit.VARIANTS and variant.max_units >= units
        assert variant.is_mrope == is_mrope
        # The scalar instances take any alignment; the wide ones come in both.
        assert variant.aligned == (aligned or vec == 1)
        # Packed addressing: wide aligned instances only; the others fall back.
        assert variant.packed == (packed and wide and aligned)
        # The prefetching twin of a five-block instance: heads of 128 elements or more.
        assert variant.prefetch_next == (variant.five_blocks_per_sm and head_dim >= 128)


def test_selftest_head_dims_reach_every_variant():
    # The GPU selftest checks that its call for a variant dispatches to it.
    from cuqk.cli import _selftest_head_dim

    for v in _jit.VARIANTS:
        head_dim = _selftest_head_dim(v)
        units = _jit.lanes_and_units(head_dim, v.vec)[1]
        assert _jit.select_variant(v.dtype, v.is_neox, v.vec, units, v.is_mrope, v.aligned,
                                   v.packed, head_dim=head_dim) == v, v.name


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
    names, doubles = [], []
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
                if ctype == "double":
                    doubles.append(name)
    assert names == [*_jit.POINTER_FIELDS, *_jit.STATIC_FIELDS]
    assert tuple(doubles) == _jit.DOUBLE_FIELDS


def test_kernel_constants_match_the_host():
    source = _jit.load_source("qk_norm_rope")
    for name in ("BLOCK_THREADS", "MROPE_ROW_FLOATS"):
        found = re.search(rf"constexpr int {name} = (\d+);", source)
        assert found and int(found.group(1)) == getattr(_jit, name), name


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
