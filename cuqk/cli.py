"""``python -m cuqk``: info, precompile, selftest, bench. Exit status is non-zero on failure."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from importlib import metadata

import numpy as np

from . import __version__, _jit, reference
from .rope_cache import rope_cos_sin_cache


def _gpu_count() -> int:
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver or no device: the CPU-only mode of each command
        return 0


def cupy_device() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(_args) -> int:
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    rows = [
        ("cuqk", __version__),
        ("python", platform.python_version()),
        ("cupy", cupy.__version__),
        ("numpy", np.__version__),
        ("nvrtc", ".".join(map(str, nvrtc.getVersion()))),
        ("torch", _version("torch")),
        ("jax", _version("jax")),
        ("kernel sources", str(_jit.KERNEL_DIR)),
        ("source fingerprint", _jit.source_fingerprint("qk_norm_rope")),
        ("cache directory", os.environ.get("CUPY_CACHE_DIR",
                                           os.path.expanduser("~/.cupy/kernel_cache"))),
        ("variants", f"{len(_jit.VARIANTS)} in the table"),
        ("programmatic launch", "on, from compute capability 9.0" if _jit.pdl_enabled()
         else "off (cuqk.set_pdl, CUQK_PDL)"),
    ]
    count = _gpu_count()
    if count:
        version = cupy.cuda.runtime.driverGetVersion()
        rows.append(("driver (CUDA)", f"{version // 1000}.{version % 1000 // 10}"))
        for d in range(count):
            props = cupy.cuda.runtime.getDeviceProperties(d)
            name = props["name"].decode()
            arch = f"sm_{props['major']}{props['minor']}"
            rows.append((f"gpu {d}", f"{name} ({arch}, {props['multiProcessorCount']} SMs)"))
    else:
        rows.append(("gpu", "none found"))
    loaded = _jit.compiled_variants()
    rows.append(("loaded in this process", ", ".join(f"{n}@{d}" for n, d in loaded) or "none"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_precompile(_args) -> int:
    if not _gpu_count():
        print("precompile: no GPU found; `python -m cuqk selftest` checks the NVRTC build")
        return 1
    start = time.perf_counter()

    def progress(i, total, variant):
        bar = "#" * (30 * i // total)
        print(f"\r[{bar:<30}] {i}/{total} {variant.name:<45}", end="", flush=True)

    done = _jit.precompile(progress=progress)
    print(f"\nprecompiled {len(done)} variants in {time.perf_counter() - start:.1f} s")
    device = cupy_device()
    for variant in done:
        print(f"  {variant.name:<45} {_jit.resource_usage(variant, device)}")
    return 0


def _gpu_array(values, dtype):
    """``values`` on the GPU in ``dtype`` (torch for bfloat16, which CuPy lacks), and a float64
    NumPy copy of exactly what was stored. None if bfloat16 is asked for without torch."""
    if dtype == "bfloat16":
        try:
            import torch
        except ImportError:
            return None, None
        stored = torch.from_numpy(values).to(torch.bfloat16)
        return stored.cuda(), stored.double().numpy()
    import cupy

    stored = values.astype(dtype)
    return cupy.asarray(stored), stored.astype(np.float64)


def _to_float64(array):
    import cupy

    if type(array).__module__.startswith("torch"):
        return array.double().cpu().numpy()
    return cupy.asnumpy(array).astype(np.float64)


def _selftest_head_dim(variant) -> int:
    """A head_dim that the dispatcher sends to ``variant``."""
    if variant.narrow:
        return 64 * variant.vec
    if variant.max_units > 1:
        return 512
    if variant.chunks and variant.packed:
        # The run-time one takes the sizes without an instance of their own.
        return variant.head_dim or 96
    # The dispatcher's own rule picks between the twins of a five-block instance.
    return next(d for d in (128, 64) if _jit.prefetch_next(variant, d) == variant.prefetch_next)


def _selftest_gpu_variant(variant, rng):
    """None if ``variant`` matches the reference, else what went wrong."""
    from .qk_norm_rope import _plan_packed, qk_norm_rope_

    head_dim = _selftest_head_dim(variant)
    # A view one element in selects the realigning or the scalar instance; a cache one element
    # off a 16-byte boundary then selects the scalar one.
    offset = 0 if variant.aligned and variant.vec > 1 else 1
    cache_offset = 1 if variant.vec == 1 else 0
    rotary = _jit.rotary_dim_reaching(variant, head_dim)
    hq, hk, hv, max_pos = 4, 2, 1, 256
    # The general instance of a kind that has a packed one is reached through leading dims
    # that do not fold into one stride: rows [2, 20] of which [2, 19] are used. A wide packed
    # instance with a narrow twin needs more heads than the narrow one takes.
    gapped = not variant.packed and dataclasses.replace(variant, packed=True) in _jit.VARIANTS
    big = (variant.packed and not variant.narrow and not variant.is_mrope
           and _jit.narrow_vec(variant.dtype, head_dim) is not None)
    tokens = _jit.NARROW_MAX_HEADS // (hq + hk) + 1 if big else 37
    rows, lead = ((2, 20), (2, 19)) if gapped else ((tokens,), (tokens,))
    used = tuple(slice(0, n) for n in lead)
    width = (hq + hk + hv) * head_dim
    flat, flat64 = _gpu_array(rng.standard_normal(math.prod(rows) * width + offset),
                              variant.dtype)
    if flat is None:
        return "skipped: bfloat16 needs torch"
    qkv = flat[offset:].reshape(*rows, width)[used]
    # mRoPE variants: Qwen2-VL-like sections (1 : 1.5 : 1.5) of the rotary half.
    half = rotary // 2
    section = (half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8)
    mrope = {"mrope_section": section} if variant.is_mrope else {}
    positions_host = rng.integers(0, max_pos, (3, *lead) if variant.is_mrope else lead)
    positions, _ = _gpu_array(positions_host, "int64")
    cache_host = rope_cos_sin_cache(max_pos, rotary)
    cache_flat, cache64 = _gpu_array(np.concatenate([np.zeros(cache_offset, np.float32),
                                                     cache_host.reshape(-1)]), "float32")
    if variant.dtype == "bfloat16":  # keep one framework per call
        import torch

        positions = torch.from_numpy(positions_host).cuda()
        cache_flat = torch.from_numpy(cache64.astype(np.float32)).cuda()
    cache = cache_flat[cache_offset:].reshape(max_pos, rotary)
    cache64 = cache64[cache_offset:].reshape(max_pos, rotary)
    args = (qkv, positions, None, None, cache)
    chosen = _plan_packed(*args, hq, hk, head_dim, hv, 1e-6, variant.is_neox, rotary, "rms",
                          False, mrope.get("mrope_section"), False).variant
    if chosen != variant:
        return f"dispatcher chose {chosen.name if chosen else None}"
    qk_norm_rope_(*args, num_q_heads=hq, num_kv_heads=hk, head_dim=head_dim, num_v_heads=hv,
                  is_neox=variant.is_neox, rotary_dim=rotary, **mrope)
    ref = reference.qkv_norm_rope(flat64[offset:].reshape(*rows, width)[used], positions_host,
                                  None, None, cache64, num_q_heads=hq, num_kv_heads=hk,
                                  head_dim=head_dim, is_neox=variant.is_neox, rotary_dim=rotary,
                                  **mrope)
    err = np.linalg.norm(_to_float64(qkv) - ref) / np.linalg.norm(ref)
    tolerance = reference.TOLERANCES[variant.dtype]
    return None if err <= tolerance else f"relative L2 error {err:.3g} > {tolerance:g}"


def cmd_selftest(_args) -> int:
    failures = 0
    rng = np.random.default_rng(0)
    if _gpu_count():
        print(f"{'variant':<45} result")
        for variant in _jit.VARIANTS:
            try:
                problem = _selftest_gpu_variant(variant, rng)
            except Exception as exc:  # report every variant, then fail
                problem = f"{type(exc).__name__}: {exc}"
            failures += problem is not None and not problem.startswith("skipped")
            print(f"{variant.name:<45} {'ok' if problem is None else 'FAIL ' + problem}")
    else:
        print("no GPU: compiling every variant with NVRTC for sm_80 and sm_90")
        for variant in _jit.VARIANTS:
            for arch in ("sm_80", "sm_90"):
                try:
                    _jit.compile_offline(variant, arch)
                    result = "ok"
                except Exception as exc:  # report every variant, then fail
                    failures += 1
                    result = f"FAIL {exc}"
                print(f"{variant.name:<45} {arch}  {result}")
        failures += _selftest_cpu_reference(rng)
    print(f"{'selftest:'} {'passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


def _selftest_cpu_reference(rng) -> int:
    """The CPU path against a direct evaluation of the formula on one token."""
    from .qk_norm_rope import qk_norm_rope_

    head_dim, hq, hk = 64, 2, 1
    qkv = rng.standard_normal((3, (hq + 2 * hk) * head_dim)).astype(np.float32)
    positions = np.array([0, 5, 11])
    freqs = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(16)[:, None] * freqs
    cache = np.concatenate([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    head = qkv[2, :head_dim].astype(np.float64)
    x = head / np.sqrt(np.mean(head**2) + 1e-6)
    half = head_dim // 2
    c, s = cache[11, :half].astype(np.float64), cache[11, half:].astype(np.float64)
    expected = np.concatenate([x[:half] * c - x[half:] * s, x[half:] * c + x[:half] * s])
    qk_norm_rope_(qkv, positions, None, None, cache, num_q_heads=hq, num_kv_heads=hk,
                  head_dim=head_dim)
    ok = np.allclose(qkv[2, :head_dim], expected, rtol=1e-5, atol=1e-6)
    print(f"{'cpu reference':<45} {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuqk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, cache directory, variants")
    sub.add_parser("precompile", help="compile every variant for this GPU")
    sub.add_parser("selftest", help="every variant against the reference (NVRTC-only without "
                                    "a GPU)")
    sub.add_parser("bench", help="benchmark (see python -m cuqk bench --help)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        if "--e2e" in rest:  # one decoder layer end to end (cuqk/bench_e2e.py)
            from . import bench_e2e

            return bench_e2e.main([a for a in rest if a != "--e2e"])
        from . import bench

        return bench.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"info": cmd_info, "precompile": cmd_precompile, "selftest": cmd_selftest}[
        args.command](args)


if __name__ == "__main__":
    sys.exit(main())
