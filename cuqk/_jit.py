"""Kernel sources, the variant table (the dispatcher), compilation and the raw launch.

One table, ``VARIANTS``, lists every template instance. It is both what ``precompile`` and the
offline NVRTC check build and what ``select_variant`` may return, so the compiled set and the
dispatchable set cannot drift.

Launches bypass CuPy's argument marshalling: the kernel takes one struct by value, packed with
``struct`` into a per-thread buffer, and goes to the driver's ``cuLaunchKernelEx`` directly
(through ctypes; CuPy's driver module has no launch with attributes, which programmatic
dependent launch needs). That keeps a call near the cost of one eager torch op.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import struct
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import cupy
from cupy_backends.cuda.api import driver, runtime

from . import _cache


def _find_kernel_dir() -> Path:
    # Installed wheels carry the sources as cuqk/kernels_cu (setup.cfg maps them there); a
    # source checkout has them beside the package.
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (candidate / "common.cuh").is_file():
            return candidate
    raise ImportError(f"cuqk: CUDA sources not found next to {here}; the installation is broken")


KERNEL_DIR = _find_kernel_dir()

# name -> (C++ storage type, itemsize, runtime code shared with common.cuh's DtypeCode)
DTYPES = {
    "float32": ("float", 4, 0),
    "float16": ("f16_t", 2, 1),
    "bfloat16": ("bf16_t", 2, 2),
}

NVRTC_OPTIONS = ("--std=c++17",)
BLOCK_THREADS = 256  # BLOCK_THREADS in qk_norm_rope.cu
# Floats per buffer of the mRoPE kernel's merged rows (MROPE_ROW_FLOATS in qk_norm_rope.cu).
MROPE_ROW_FLOATS = 5120
# Rounds of BLOCK_THREADS / lanes heads per mRoPE window (one block barrier each), at most.
MROPE_MAX_ROUNDS = 4
MIN_COMPUTE_CAPABILITY = 80
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.MULTILINE)


def load_source(family: str) -> str:
    """Return ``kernels_cu/<family>.cu`` with local ``#include "..."`` lines inlined.

    Inlining makes the source string cover every header, so CuPy's disk cache (keyed on the
    source) recompiles when any of them changes.
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (KERNEL_DIR / name).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(f"{family}.cu")


def source_fingerprint(family: str) -> str:
    return hashlib.sha256(load_source(family).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Variant:
    """One template instance of ``qk_norm_rope_kernel`` (``qk_norm_mrope_kernel`` for mRoPE).

    ``aligned=False``: a wide instance for q and k that are only element-aligned (views that
    start mid-vector); each access then follows its address's alignment. ``packed``: an aligned
    instance for in-place calls on a packed qkv whose tokens are one stride apart, with a
    float32 cache and weights of the activations' dtype; with ``vec`` below ``wide_vec`` it is
    a narrow one, a warp per head for small calls (``narrow_vec``). ``prefetch_next``: the
    twin of a five-block instance whose launches ask the L2 for each group's next head; the
    other twin streams its stores instead (the kernel's STREAM_STORES; ``prefetch_next``, the
    function, says which twin a call takes). ``chunks``: an unaligned 16-bit NeoX instance
    that moves each head as the aligned 16-byte chunks it overlaps (the kernel's CHUNKS), for
    calls whose rotary_dim is head_dim and whose outputs sit at their inputs' offsets within
    16 bytes (``chunks_fit``); it may be ``packed``. ``head_dim``: a packed ``chunks`` instance
    compiled for that head size (``CHUNKS_PACKED_HEAD_DIMS``; the kernel's HEAD_DIM), 0 for
    one that reads it at run time."""

    dtype: str
    is_neox: bool
    vec: int
    max_units: int
    is_mrope: bool = False
    aligned: bool = True
    packed: bool = False
    prefetch_next: bool = False
    chunks: bool = False
    head_dim: int = 0

    @property
    def narrow(self) -> bool:
        """A warp per head (``vec`` below ``wide_vec``): the kernel's NARROW."""
        return self.packed and not self.is_mrope and self.vec < wide_vec(self.dtype)

    @property
    def five_blocks_per_sm(self) -> bool:
        """A wide aligned packed 1-D instance of 16-bit data: the kernel's five_blocks_per_sm,
        bounded to 5 blocks of 256 threads per SM (48 registers). The packed ``chunks``
        instances share the bound but not the rest (rope_min_blocks in the kernel)."""
        return (self.packed and self.aligned and not self.is_mrope and not self.narrow
                and DTYPES[self.dtype][1] == 2)

    @property
    def name(self) -> str:
        style = "neox" if self.is_neox else "gptj"
        mrope = "_mrope" if self.is_mrope else ""
        realign = "" if self.aligned else "_realign"
        packed = "_packed" if self.packed else ""
        prefetch = "_prefetch" if self.prefetch_next else ""
        chunks = "_chunks" if self.chunks else ""
        fixed = f"_d{self.head_dim}" if self.head_dim else ""
        return (f"qk_norm_rope_{self.dtype}_{style}_vec{self.vec}_units{self.max_units}{mrope}"
                f"{realign}{chunks}{packed}{prefetch}{fixed}")

    @property
    def expression(self) -> str:
        flags = [DTYPES[self.dtype][0], "true" if self.is_neox else "false", str(self.vec),
                 str(self.max_units), "true" if self.aligned else "false",
                 "true" if self.packed else "false"]
        if not self.is_mrope:  # STREAM_STORES, CHUNKS, HEAD_DIM
            flags.append("true" if self.five_blocks_per_sm and not self.prefetch_next else "false")
            flags.append("true" if self.chunks else "false")
            flags.append(str(self.head_dim))
        kernel = "qk_norm_mrope_kernel" if self.is_mrope else "qk_norm_rope_kernel"
        return f"{kernel}<{', '.join(flags)}>"


def wide_vec(dtype: str) -> int:
    """Elements in one 16-byte access of ``dtype``."""
    return 16 // DTYPES[dtype][1]


# Wide (16-byte) instances need 1 unit per lane except float32 past head_dim 256; the scalar
# fallback for unaligned data holds up to 256 units per head over 32 lanes.
_SCALAR_UNITS = 8
# Narrow packed instances: a whole warp per head, one unit per lane (head_dim = 64 * vec).
NARROW_VECS = {"float32": (2,), "float16": (2, 4), "bfloat16": (2, 4)}
# Up to this many heads in a call (tokens x (Hq + Hk)) packed calls take the narrow instance.
NARROW_MAX_HEADS = 2048
# The chunks instances' weight table holds heads up to this size (CHUNK_TABLE_UNITS in the
# kernel source, 16 units of 16 elements).
CHUNKS_MAX_HEAD_DIM = 256
# Head sizes with a packed chunks instance of their own (the kernel's HEAD_DIM); other sizes
# take the one that reads head_dim at run time.
CHUNKS_PACKED_HEAD_DIMS = (64, 128, 256)


def _build_variants() -> tuple[Variant, ...]:
    out = []
    for is_mrope in (False, True):
        for dtype in DTYPES:
            for is_neox in (True, False):
                vec = wide_vec(dtype)
                for units in (1, 2) if dtype == "float32" else (1,):
                    for aligned in (True, False):
                        for packed in (False, True) if aligned else (False,):
                            variant = Variant(dtype, is_neox, vec, units, is_mrope, aligned,
                                              packed)
                            out.append(variant)
                            if variant.five_blocks_per_sm:
                                out.append(replace(variant, prefetch_next=True))
                if is_neox and not is_mrope and DTYPES[dtype][1] == 2:
                    out += [Variant(dtype, True, vec, 1, aligned=False, packed=packed, chunks=True,
                                    head_dim=head_dim)
                            for packed, head_dim in ((False, 0), (True, 0),
                                                     *((True, d) for d in CHUNKS_PACKED_HEAD_DIMS))]
                out.append(Variant(dtype, is_neox, 1, _SCALAR_UNITS, is_mrope))
                if not is_mrope:
                    out += [Variant(dtype, is_neox, vec, 1, packed=True)
                            for vec in NARROW_VECS[dtype]]
    return tuple(out)


VARIANTS = _build_variants()
_BY_KEY = {}
for _v in VARIANTS:
    if _v.prefetch_next:
        continue  # select_variant picks these by head_dim
    _BY_KEY.setdefault((_v.dtype, _v.is_neox, _v.vec, _v.is_mrope, _v.aligned, _v.packed,
                        _v.chunks, _v.head_dim), []).append(_v)


def narrow_vec(dtype: str, head_dim: int) -> int | None:
    """The vec of the narrow packed instance for ``head_dim``, if there is one.

    Few heads run at once in a small call, so a head's instruction chain is the call's time:
    a warp per head gives each lane a quarter of a wide lane's elements and conversions, for
    two more shuffles in the reduction."""
    vec = head_dim // 64
    return vec if head_dim % 64 == 0 and vec in NARROW_VECS[dtype] else None


def lanes_and_units(head_dim: int, vec: int) -> tuple[int, int]:
    """Threads per head (a power of two <= 32) and the units each must hold."""
    units = head_dim // (2 * vec)
    lanes = min(32, 1 << (units - 1).bit_length())
    return lanes, -(-units // lanes)


def prefetch_next(variant: Variant, head_dim: int) -> bool:
    """Whether calls of ``head_dim`` take the prefetching twin of ``variant``.

    Only five-block instances have one, and only heads of at least 128 elements take it: it
    asks the L2 for each group's next head ahead of its loads and stores plainly, where the
    other twin streams its stores (``st.global.cs``). Measured on an H200 (bf16, medians of two
    interleaved runs; us at T = 8192 / 32768):
    - plain stores with the prefetch and without: Qwen3-8B 48.6 / 184.0 against 49.5 / 186.6,
      D=256 49.6 / 187.4 against 50.9 / 191.6, but GPT-J D=64 29.0 / 104.4 against 26.7 / 94.3;
    - no prefetch, streaming stores and plain: GPT-J D=64 25.3 / 92.4 against 26.5 / 94.5
      (5.2 against 5.9 at T=1024);
    - the prefetch, streaming stores and plain: Qwen3-8B 49.1 / 185.8 against 48.5 / 183.5,
      D=256 50.2 / 189.3 against 49.6 / 187.7."""
    return variant.five_blocks_per_sm and head_dim >= 128


def chunks_fit(dtype: str, is_neox: bool, vec: int, is_mrope: bool, rotary_dim: int,
               head_dim: int) -> bool:
    """Whether a call of unaligned heads can take a ``chunks`` instance, given that its
    outputs sit at their inputs' offsets within 16 bytes (the caller checks that)."""
    return (DTYPES[dtype][1] == 2 and is_neox and vec == wide_vec(dtype) and not is_mrope
            and rotary_dim == head_dim <= CHUNKS_MAX_HEAD_DIM)


def rotary_dim_reaching(variant: Variant, head_dim: int) -> int:
    """A rotary_dim with which unaligned calls of ``head_dim`` can reach ``variant``: the
    narrow-access realigning instances of kinds that ``chunks_fit`` are only taken under
    partial rotary (for the selftest and the sanitizer's cases)."""
    narrow_access = (not variant.aligned and not variant.chunks and variant.vec > 1
                     and chunks_fit(variant.dtype, variant.is_neox, variant.vec,
                                    variant.is_mrope, head_dim, head_dim))
    return head_dim // 2 if narrow_access else head_dim


def select_variant(dtype: str, is_neox: bool, vec: int, units_per_lane: int,
                   is_mrope: bool = False, aligned: bool = True, packed: bool = False, *,
                   head_dim: int, chunks: bool = False) -> Variant:
    """The smallest instance that holds ``units_per_lane``; ValueError if none does. The scalar
    instances (``vec=1``) take any alignment and exist only as ``aligned=True``; ``packed`` is
    a preference that only the wide aligned and the ``chunks`` instances take; ``chunks`` one
    of unaligned wide calls, for the caller to ask where ``chunks_fit``; ``head_dim`` picks
    between the twins of a five-block instance (``prefetch_next``), so it has no default that
    would pick one silently."""
    chunks = chunks and not aligned and vec > 1
    packed = packed and vec > 1 and (aligned or chunks)
    key = (dtype, is_neox, vec, is_mrope, aligned or vec == 1, packed, chunks)
    fixed = head_dim if packed and chunks and head_dim in CHUNKS_PACKED_HEAD_DIMS else 0
    for variant in _BY_KEY.get((*key, fixed), ()):
        if variant.max_units >= units_per_lane:
            if prefetch_next(variant, head_dim):
                return replace(variant, prefetch_next=True)
            return variant
    supported = sorted({(v.dtype, v.vec, v.max_units) for v in VARIANTS})
    raise ValueError(
        f"no kernel variant for dtype={dtype}, is_neox={is_neox}, vec={vec}, "
        f"units_per_lane={units_per_lane}, is_mrope={is_mrope}; "
        f"supported (dtype, vec, max_units): {supported}"
    )


# ----------------------------------------------------------------------------- compilation

_kernels: dict[tuple[Variant, int], object] = {}  # cupy.RawKernel, kept alive for its handle
_functions: dict[tuple[Variant, int], int] = {}
_resident: dict[tuple[Variant, int], int] = {}
_compile_lock = threading.Lock()


def get_function(variant: Variant, device: int, stream: int = 0) -> int:
    """Return the CUfunction handle of ``variant`` on ``device``, compiling it if needed."""
    key = (variant, device)
    func = _functions.get(key)
    if func is not None:
        return func
    if stream and cupy.cuda.runtime.streamIsCapturing(stream):
        raise RuntimeError(
            f"cuqk kernel {variant.name} is not compiled yet and the stream is being captured "
            "into a CUDA graph; call the op once before capture or run cuqk.precompile()"
        )
    with _compile_lock:
        func = _functions.get(key)
        if func is None:
            with cupy.cuda.Device(device):
                # A string such as "90" or "100": major digits, then one minor digit.
                capability = int(cupy.cuda.Device(device).compute_capability)
                if capability < MIN_COMPUTE_CAPABILITY:
                    raise RuntimeError(
                        f"cuqk needs compute capability 8.0 or newer; device {device} has "
                        f"{capability // 10}.{capability % 10}"
                    )
                kernel, func = _cache.load_kernel(
                    load_source("qk_norm_rope"), variant.expression, NVRTC_OPTIONS)
                per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(func, BLOCK_THREADS, 0)
                sms = runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device)
            _kernels[key] = kernel
            _resident[key] = max(1, per_sm) * sms
            # NVRTC from CUDA 12 on builds such a device's kernels for 9.0 or newer, so with
            # the wait in wait_for_prior_grids.
            if capability >= _PDL_MIN_COMPUTE_CAPABILITY:
                _pdl_devices.add(device)
            _functions[key] = func
    return func


def resident_blocks(variant: Variant, device: int) -> int:
    """How many blocks of a loaded ``variant`` fit on ``device`` at once.

    Launches use at most this many: the kernel strides over its heads, so a grid that is
    resident from start to end keeps every warp streaming and never waits for a block's
    slowest warp before the next block can start (Qwen3-8B shape, bf16, T=16384 on an H100:
    one block per 32 heads reached 78% of copy bandwidth, the resident grid 91%).
    """
    return _resident[(variant, device)]


def compiled_variants() -> list[tuple[str, int]]:
    """Names and devices of the variants loaded in this process."""
    return sorted((v.name, d) for v, d in _functions)


def resource_usage(variant: Variant, device: int) -> str:
    """Registers and local-memory bytes per thread of a loaded variant (spills show here)."""
    kernel = _kernels[(variant, device)]
    return f"{kernel.num_regs} registers, {kernel.local_size_bytes} B local"


def precompile(dtypes=None, device: int | None = None, progress=None) -> list[Variant]:
    """Compile and load every variant (or those of ``dtypes``) for ``device`` (default: current).

    ``progress``, if given, is called as ``progress(index, total, variant)`` after each one.
    """
    if device is None:
        device = cupy.cuda.runtime.getDevice()
    chosen = [v for v in VARIANTS if dtypes is None or v.dtype in dtypes]
    for i, variant in enumerate(chosen):
        get_function(variant, device)
        if progress is not None:
            progress(i + 1, len(chosen), variant)
    return chosen


def compile_offline(variant: Variant, arch: str, *, ptx: bool = False) -> bytes:
    """Compile ``variant`` for ``arch`` (e.g. ``"sm_90"``) with NVRTC alone into a cubin, or
    with ``ptx`` return the PTX it goes through (the tests read which instructions a variant
    uses there).

    Needs no GPU, which is how CI checks that every variant builds for every target and what
    ``cubin_resources`` reads.
    """
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(load_source("qk_norm_rope"), "qk_norm_rope.cu", (), ())
    try:
        nvrtc.addNameExpression(prog, variant.expression)
        target = f"--gpu-architecture={arch}"
        try:
            nvrtc.compileProgram(prog, (*NVRTC_OPTIONS, target))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"{variant.name} ({arch}):\n{nvrtc.getProgramLog(prog)}") from exc
        nvrtc.getLoweredName(prog, variant.expression)
        return nvrtc.getPTX(prog) if ptx else nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


# The .nv.info attributes of a cubin that cubin_resources reads: each is (format, attribute,
# 16-bit size) then its bytes; these two hold (symbol index, value) pairs.
_EIATTR_FRAME_SIZE = 0x11
_EIATTR_REGCOUNT = 0x2F


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """Registers per thread and local-memory frame bytes (spills) of the one kernel in a cubin
    from ``compile_offline``: what the driver reports once it is loaded, read without a GPU."""
    missing = ValueError("not a cubin with a .nv.info section")
    if cubin[:4] != b"\x7fELF":
        raise missing
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    if shstrndx >= shnum:
        raise missing
    # ELF64 section headers: name, type, flags, addr, offset, size, link, info, align, entsize.
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
               for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for header in headers:
        name_at = names_at + header[0]
        if cubin[name_at:cubin.index(b"\0", name_at)] != b".nv.info":
            continue
        values = {}
        at, end = header[4], header[4] + header[5]
        while at < end:
            attribute, size = cubin[at + 1], struct.unpack_from("<H", cubin, at + 2)[0]
            if attribute in (_EIATTR_FRAME_SIZE, _EIATTR_REGCOUNT):
                values[attribute] = struct.unpack_from("<I", cubin, at + 8)[0]
            at += 4 + size
        return values[_EIATTR_REGCOUNT], values.get(_EIATTR_FRAME_SIZE, 0)
    raise missing


# ----------------------------------------------------------------------------- launching

# QkNormRopeParams in kernels_cu/qk_norm_rope.cu: the pointers, then the fields a plan fixes.
POINTER_FIELDS = (
    "q_in", "k_in", "q_out", "k_out", "gate_out", "positions", "cache", "q_weight", "k_weight",
)
STATIC_FIELDS = (
    "num_tokens", "num_q_heads", "num_k_heads", "head_div_magic", "head_div_shift",
    "head_dim", "rotary_dim", "norm_mode", "lanes_log2", "rope_first", "prefetch_next", "eps",
    "inv_head_dim",
    "pos_stride_outer", "pos_is_int64", "cache_row_stride", "max_position",
    "q_in_outer", "q_in_inner", "q_in_head", "k_in_outer", "k_in_inner", "k_in_head",
    "q_out_outer", "q_out_inner", "q_out_head", "k_out_outer", "k_out_inner", "k_out_head",
    "pos_stride_inner", "pos_stride_section", "cache_dtype", "weight_dtype", "tokens_inner",
    "mrope_section0", "mrope_section1", "mrope_section2", "mrope_interleaved", "mrope_rounds",
)
# The struct's floats, side by side in 8 bytes; the other fields are long long. Floats rather
# than doubles: a double's conversion took four instructions a head where the compiler
# rematerialised it.
FLOAT_FIELDS = ("eps", "inv_head_dim")
_STATICS = struct.Struct("<" + "".join("f" if n in FLOAT_FIELDS else "q" for n in STATIC_FIELDS))
# One pack per launch: the pointers, then the plan's pre-packed statics as raw bytes.
_PARAMS = struct.Struct(f"<{len(POINTER_FIELDS)}Q{_STATICS.size}s")
PARAMS_SIZE = _PARAMS.size


def mrope_rounds(lanes: int, num_heads: int, rotary_dim: int) -> int:
    """Most rounds per mRoPE window, up to MROPE_MAX_ROUNDS, whose window of
    ``rounds * BLOCK_THREADS // lanes`` consecutive heads spans few enough tokens that their
    rows fit MROPE_ROW_FLOATS; the kernel uses fewer when there are too few heads to give every
    block a window. Fewer barriers per head measured faster (Qwen3-VL shape, bf16, T=8192: 66%
    of copy with one round per window, 83% with two, 84% with four)."""
    rounds = 1
    for r in range(2, MROPE_MAX_ROUNDS + 1):
        window = r * BLOCK_THREADS // lanes
        if (-(-(window - 1) // num_heads) + 1) * rotary_dim <= MROPE_ROW_FLOATS:
            rounds = r
    return rounds


def fast_division(divisor: int) -> tuple[int, int]:
    """``(magic, shift)`` with ``n // divisor == (n * magic) >> shift`` for all ``0 <= n < 2**31``.

    ``shift = 31 + ceil(log2(divisor))`` and ``magic = ceil(2**shift / divisor)`` (below 2**32):
    the error ``magic * divisor - 2**shift`` is under ``divisor``, so it adds less than
    ``1 / divisor`` to ``n / divisor`` and never reaches the next integer.
    """
    shift = 31 + (divisor - 1).bit_length()
    return -(-(1 << shift) // divisor), shift


def pack_statics(values: dict) -> bytes:
    """The plan-constant tail of the kernel's parameter struct (``inv_head_dim`` is derived)."""
    values = {**values, "inv_head_dim": 1.0 / values["head_dim"]}
    # Rounded to float32 as a C cast does: past its range, infinity (struct would refuse it).
    return _STATICS.pack(*(ctypes.c_float(values[name]).value if name in FLOAT_FIELDS
                           else int(values[name]) for name in STATIC_FIELDS))


# cuLaunchKernelEx's CUlaunchConfig (grid, block, shared bytes, stream, attributes, their count)
# and one CUlaunchAttribute: a 4-byte id, then at offset 8 a 64-byte value union whose first
# int is the flag this attribute sets.
_CONFIG = struct.Struct("<7I4xQQI4x")
_ATTRIBUTE = struct.Struct("<I4xi60x")
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_PDL_MIN_COMPUTE_CAPABILITY = 90
_pdl = os.environ.get("CUQK_PDL", "1") != "0"
_pdl_devices: set[int] = set()  # devices whose loaded kernels wait for prior grids


def set_pdl(enabled: bool) -> bool:
    """Turn programmatic dependent launch on (the default; ``CUQK_PDL=0`` starts with it off)
    or off.

    On compute capability 9.0 and newer, cuqk launches its kernels with programmatic stream
    serialization: a launch may begin while the kernel before it in the stream is still
    running, and the kernel waits for that one to finish (``griddepcontrol.wait``) before it
    reads or writes global memory, so results are unchanged. Only the launch latency, block
    start-up and (in the prefetching five-block instances) an L2 prefetch of each group's first
    head overlap the previous kernel; the kernel also lets the next kernel launched this way
    start early, which then must wait the same way before reading cuqk's output. Older devices
    launch plainly. Returns the previous setting. A CUDA graph keeps the setting its
    launches were captured with.
    """
    global _pdl
    previous, _pdl = _pdl, bool(enabled)
    return previous


def pdl_enabled() -> bool:
    """Whether launches on compute capability 9.0+ use programmatic dependent launch."""
    return _pdl


def _load_launch_function():
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        function = ctypes.CDLL(name).cuLaunchKernelEx
    except AttributeError as exc:
        raise RuntimeError(
            f"cuqk launches through cuLaunchKernelEx, which this CUDA driver ({name}) lacks; "
            "it needs a driver of CUDA 11.8 or newer") from exc
    function.argtypes = (ctypes.c_void_p,) * 4
    function.restype = ctypes.c_int
    return function


class _ThreadBuffers(threading.local):
    def __init__(self):
        self.params = ctypes.create_string_buffer(PARAMS_SIZE)
        self.argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))
        self.argv_addr = ctypes.addressof(self.argv)
        self.attribute = ctypes.create_string_buffer(_ATTRIBUTE.size)
        _ATTRIBUTE.pack_into(self.attribute, 0,
                             _CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1)
        self.attribute_addr = ctypes.addressof(self.attribute)
        self.config = ctypes.create_string_buffer(_CONFIG.size)
        self.config_addr = ctypes.addressof(self.config)


_buffers = _ThreadBuffers()
_launch_function = None
_CUDA_ERROR_INVALID_CONTEXT = 201


def _launch_raw(func, device):
    global _launch_function
    if _launch_function is None:
        _launch_function = _load_launch_function()
    status = _launch_function(_buffers.config_addr, func, _buffers.argv_addr, None)
    if status == _CUDA_ERROR_INVALID_CONTEXT:
        runtime.setDevice(device)
        status = _launch_function(_buffers.config_addr, func, _buffers.argv_addr, None)
    if status:
        raise driver.CUDADriverError(status)


def launch(func: int, blocks: int, stream: int, device: int, pointers, statics: bytes) -> None:
    """Launch ``func`` on ``blocks`` x BLOCK_THREADS threads of ``stream`` on ``device``, with
    programmatic stream serialization where ``set_pdl`` and the device allow it.

    A thread on which the driver has no context bound yet (the runtime binds it lazily) gets
    the device's primary context and the launch is retried once.
    """
    _PARAMS.pack_into(_buffers.params, 0, *pointers, statics)
    _CONFIG.pack_into(_buffers.config, 0, blocks, 1, 1, BLOCK_THREADS, 1, 1, 0, stream,
                      _buffers.attribute_addr, _pdl and device in _pdl_devices)
    if runtime.getDevice() == device:
        _launch_raw(func, device)
    else:
        with cupy.cuda.Device(device):
            _launch_raw(func, device)
