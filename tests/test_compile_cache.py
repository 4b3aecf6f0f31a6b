"""The compile cache: concurrent compiles, damaged entries and an unwritable directory.

CPU part: CuPy's disk cache (which cuqk relies on) reads a damaged entry as a miss and never
exposes a half-written one; cuqk's fallback to in-memory kernels and its single warning, with
the compile step mocked; the NVRTC build that fallback uses.
GPU part: the real thing in fresh processes, each with its own CUPY_CACHE_DIR. Run this file as
a script to get one such process (see ``_child``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import TOLERANCES, cos_sin_cache64, rel_l2, requires_gpu

import cuqk
from cuqk import _cache, _jit, reference

SOURCE = _jit.load_source("qk_norm_rope")


def _refuses_files(directory: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=directory):
            return False
    except OSError:
        return True


@pytest.fixture
def unwritable_dir(tmp_path):
    """A cache directory nobody can create files in: a read-only one, or /sys for root."""
    path = tmp_path / "read-only-cache"
    path.mkdir()
    path.chmod(0o555)
    try:
        if _refuses_files(path):
            yield str(path)
        elif _refuses_files(Path("/sys")):  # root ignores permission bits, not sysfs
            yield "/sys"
        else:
            pytest.skip("no directory here refuses new files")
    finally:
        path.chmod(0o755)


def _disk_backend(directory):
    module = pytest.importorskip("cupy.cuda._compiler_cache", reason="CuPy < 14.2 layout")
    return module.DiskKernelCacheBackend(str(directory))


# ============================================================================ CPU part


@pytest.mark.parametrize("damage", ["truncated", "one byte flipped", "empty"])
def test_cupy_reads_a_damaged_entry_as_a_miss(tmp_path, damage):
    """A miss means compile and save again: what rebuilds a damaged entry."""
    backend = _disk_backend(tmp_path)
    payload = np.random.default_rng(0).bytes(4096)
    backend.save("entry.cubin", payload, "")
    assert backend.load("entry.cubin") == payload
    path = tmp_path / "entry.cubin"
    data = path.read_bytes()
    path.write_bytes({
        "truncated": data[: len(data) // 2],
        "one byte flipped": data[:2000] + bytes([data[2000] ^ 1]) + data[2001:],
        "empty": b"",
    }[damage])
    assert backend.load("entry.cubin") is None


def test_concurrent_saves_never_expose_a_partial_entry(tmp_path):
    """Writers of one entry and a reader racing them: the reader sees a whole entry or none."""
    backend = _disk_backend(tmp_path)
    payloads = [bytes([i]) * (1 << 20) for i in range(1, 5)]
    torn = []
    done = threading.Event()

    def write(payload):
        for _ in range(10):
            backend.save("entry.cubin", payload, "")

    def read():
        while not done.is_set():
            got = backend.load("entry.cubin")
            if got is not None and got not in payloads:
                torn.append(len(got))

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    reader.join()
    assert not torn
    assert backend.load("entry.cubin") in payloads
    assert sorted(os.listdir(tmp_path)) == ["entry.cubin"], "temporary files left behind"


def test_cupy_cannot_save_into_an_unwritable_dir(unwritable_dir):
    """Why cuqk needs a fallback: CuPy compiles, then fails to save and raises."""
    with pytest.raises(OSError):
        _disk_backend(unwritable_dir).save("entry.cubin", b"x", "")


def test_cache_dir_is_the_one_cupy_reads_at_import(tmp_path):
    code = "from cuqk import _cache; print(_cache.cupy_cache_dir())"
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(tmp_path),
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(tmp_path)


class _FakeMemoryKernel:
    built: ClassVar[list] = []

    def __init__(self, source, expression, options):
        self.built.append(expression)
        self.ptr = 1000 + len(self.built)


@pytest.fixture
def fresh_fallback(monkeypatch):
    monkeypatch.setattr(_cache, "_memory_only", False)
    monkeypatch.setattr(_FakeMemoryKernel, "built", [])
    monkeypatch.setattr(_cache, "MemoryKernel", _FakeMemoryKernel)


def test_unusable_cache_falls_back_to_memory_with_one_warning(monkeypatch, fresh_fallback):
    attempts = []

    def raw_module_that_cannot_save(*, code, options, name_expressions):
        attempts.append(name_expressions)
        raise PermissionError(13, "Permission denied", "/read-only/cache/tmpa1b2c3")

    monkeypatch.setattr(_cache.cupy, "RawModule", raw_module_that_cannot_save)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = [_cache.load_kernel(SOURCE, e, _jit.NVRTC_OPTIONS) for e in ("a<1>", "b<2>")]
    assert [type(kernel) for kernel, _ in loaded] == [_FakeMemoryKernel] * 2
    assert [handle for _, handle in loaded] == [kernel.ptr for kernel, _ in loaded]
    assert _FakeMemoryKernel.built == ["a<1>", "b<2>"]
    assert attempts == [["a<1>"]], "after one failure the disk cache is not tried again"
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert _cache.cupy_cache_dir() in message and "CUPY_CACHE_DIR" in message
    assert "/read-only/cache/tmpa1b2c3" in message


def test_compile_errors_are_not_taken_for_cache_trouble(monkeypatch, fresh_fallback):
    from cupy.cuda.compiler import CompileException

    def raw_module_that_fails_to_compile(**kwargs):
        raise CompileException("error: expected a ';'", SOURCE, "k.cu", ())

    monkeypatch.setattr(_cache.cupy, "RawModule", raw_module_that_fails_to_compile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CompileException):
            _cache.load_kernel(SOURCE, "a<1>", _jit.NVRTC_OPTIONS)
    assert not _cache._memory_only and not _FakeMemoryKernel.built


@pytest.mark.parametrize(("capability", "supported", "expected"), [
    (90, (80, 86, 90, 100), ("--gpu-architecture=sm_90", False)),
    (130, (80, 90, 120, 121), ("--gpu-architecture=compute_121", True)),
    (89, (80, 86, 90), ("--gpu-architecture=compute_86", True)),
])
def test_nvrtc_target_builds_what_the_device_runs(capability, supported, expected):
    assert _cache.nvrtc_target(capability, supported) == expected


def test_nvrtc_target_refuses_a_device_older_than_nvrtc_knows():
    with pytest.raises(RuntimeError, match="compute capability 75"):
        _cache.nvrtc_target(75, (80, 90))


@pytest.mark.parametrize("ptx", [False, True], ids=["cubin", "ptx"])
def test_in_memory_build_gives_the_image_and_mangled_name(ptx):
    variant = _jit.VARIANTS[0]
    target = "--gpu-architecture=" + ("compute_80" if ptx else "sm_80")
    image, lowered = _cache.nvrtc_image(
        SOURCE, variant.expression, (*_jit.NVRTC_OPTIONS, *_cache.CUPY_IMPLICIT_OPTIONS),
        target, ptx)
    assert lowered.startswith("_Z") and "qk_norm_rope_kernel" in lowered
    if ptx:
        assert f".entry {lowered}".encode() in image
    else:
        assert image[:4] == b"\x7fELF" and lowered.encode() in image


# ============================================================================ GPU part

HEADS = (4, 2, 2)  # Hq, Hk, Hv
HEAD_DIM = 128


def _case_error(dtype: str) -> float:
    """One small packed call on CuPy arrays: the relative error of q | k against the reference
    (inf if V changed). Host-built inputs, so no CuPy kernel is compiled besides cuqk's."""
    import cupy

    hq, hk, hv = HEADS
    rng = np.random.default_rng(7)
    tokens, k_end = 5, (hq + hk) * HEAD_DIM
    qkv = rng.standard_normal((tokens, (hq + hk + hv) * HEAD_DIM)).astype(dtype)
    positions = rng.integers(0, 64, tokens)
    cache = cos_sin_cache64(64, HEAD_DIM)
    weight = (1 + 0.2 * rng.standard_normal(HEAD_DIM)).astype(dtype)
    on_gpu = cupy.asarray(qkv)
    cuqk.qk_norm_rope_(on_gpu, cupy.asarray(positions), cupy.asarray(weight),
                       cupy.asarray(weight), cupy.asarray(cache.astype(np.float32)),
                       num_q_heads=hq, num_kv_heads=hk, head_dim=HEAD_DIM, num_v_heads=hv)
    out = on_gpu.get()
    if not np.array_equal(out[:, k_end:], qkv[:, k_end:]):
        return float("inf")
    w64 = weight.astype(np.float64)
    ref = reference.qkv_norm_rope(qkv.astype(np.float64), positions, w64, w64, cache,
                                  num_q_heads=hq, num_kv_heads=hk, head_dim=HEAD_DIM)
    return rel_l2(out[:, :k_end], ref[:, :k_end])


def _child(out_path: str, dtypes: str, go_file: str) -> None:
    """One process: optionally wait for ``go_file``, run one call per dtype, write a report."""
    if go_file:
        import cupy

        cupy.asarray(np.zeros(1))  # the CUDA context, so that after "go" only the compile races
        Path(out_path + ".ready").touch()
        while not os.path.exists(go_file):
            time.sleep(0.001)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.time()
        errors = {dtype: _case_error(dtype) for dtype in dtypes.split(",")}
        end = time.time()
    report = {"start": start, "end": end, "errors": errors,
              "warnings": [str(w.message) for w in caught],
              "variants": [name for name, _ in _jit.compiled_variants()],
              "resources": [_jit.resource_usage(v, d) for v, d in _jit._functions]}
    Path(out_path).write_text(json.dumps(report))


def _child_env(cache_dir) -> dict:
    package_root = str(Path(cuqk.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache_dir), PYTHONPATH=path)
    env.pop("CUPY_CACHE_IN_MEMORY", None)
    return env


def _start(cache_dir, report: Path, dtypes=("float16",), go_file=None):
    return subprocess.Popen(
        [sys.executable, __file__, str(report), ",".join(dtypes), str(go_file or "")],
        env=_child_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, report: Path) -> dict:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{output[-4000:]}"
    result = json.loads(report.read_text())
    for dtype, err in result["errors"].items():
        assert err <= TOLERANCES[dtype], f"{dtype}: error {err} ({result['variants']})"
    return result


def _run(cache_dir, report: Path, dtypes=("float16",)) -> dict:
    return _finish(_start(cache_dir, report, dtypes), report)


def _cuqk_warnings(result) -> list:
    return [w for w in result["warnings"] if w.startswith("cuqk:")]


def _snapshot(directory) -> dict:
    """name -> (inode, mtime, size): a rewrite or a new entry changes it."""
    return {e.name: (e.stat().st_ino, e.stat().st_mtime_ns, e.stat().st_size)
            for e in os.scandir(directory)}


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """Two processes released together onto one empty cache directory."""
    tmp = tmp_path_factory.mktemp("concurrent")
    cache_dir = tmp / "cache"
    go = tmp / "go"
    reports = [tmp / f"child{i}.json" for i in range(2)]
    procs = [_start(cache_dir, r, go_file=go) for r in reports]
    deadline = time.monotonic() + 120
    while not all(Path(f"{r}.ready").exists() for r in reports):
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"child did not get ready: {dead[0].communicate()[0][-4000:]}"
                        if dead else "children did not get ready in 120 s")
        time.sleep(0.01)
    go.touch()
    results = [_finish(p, r) for p, r in zip(procs, reports)]
    return cache_dir, results, _snapshot(cache_dir)


@requires_gpu
def test_two_processes_compiling_at_once_both_succeed(warm_cache):
    _, (a, b), snapshot = warm_cache
    assert a["start"] < b["end"] and b["start"] < a["end"], "the two compiles did not overlap"
    assert not _cuqk_warnings(a) and not _cuqk_warnings(b)
    assert snapshot and all(name.endswith(".cubin") for name in snapshot), sorted(snapshot)


@requires_gpu
def test_a_third_process_loads_the_cache_without_compiling(warm_cache, tmp_path):
    cache_dir, cold, snapshot = warm_cache
    warm = _run(cache_dir, tmp_path / "third.json")
    assert not _cuqk_warnings(warm)
    # Every compile ends in a save, which renames a new file into place (a new inode).
    assert _snapshot(cache_dir) == snapshot, "the third process compiled and saved again"
    timings = [round(r["end"] - r["start"], 3) for r in (*cold, warm)]
    print(f"first call: cold {timings[:2]} s, from the cache {timings[2]} s")


@requires_gpu
@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_entry_is_rebuilt(warm_cache, tmp_path, damage):
    cache_dir = tmp_path / "cache"
    shutil.copytree(warm_cache[0], cache_dir)
    backend = _disk_backend(cache_dir)
    for entry in cache_dir.iterdir():
        data = entry.read_bytes()
        middle = len(data) // 2
        flipped = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        entry.write_bytes(data[:middle] if damage == "truncated"
                          else data[:middle] + flipped + data[middle + 64:])
        assert backend.load(entry.name) is None
    rebuilt = _run(cache_dir, tmp_path / "rebuild.json")
    assert not _cuqk_warnings(rebuilt)
    assert all(backend.load(e.name) is not None for e in cache_dir.iterdir())
    snapshot = _snapshot(cache_dir)
    _run(cache_dir, tmp_path / "after.json")
    assert _snapshot(cache_dir) == snapshot, "the rebuilt entry was not loaded"


@requires_gpu
def test_an_unwritable_cache_dir_works_with_one_warning(unwritable_dir, tmp_path):
    before = sorted(os.listdir(unwritable_dir))
    result = _run(unwritable_dir, tmp_path / "unwritable.json", ("float16", "float32"))
    assert len(result["variants"]) == 2, result["variants"]
    assert all("registers" in r for r in result["resources"]), result["resources"]
    ours = _cuqk_warnings(result)
    assert len(ours) == 1, ours
    assert unwritable_dir in ours[0] and "CUPY_CACHE_DIR" in ours[0]
    assert sorted(os.listdir(unwritable_dir)) == before


@requires_gpu
def test_a_read_only_warm_cache_is_used_without_a_warning(warm_cache, tmp_path):
    """A cache built ahead of time and shipped read-only (e.g. in an image) still serves."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(warm_cache[0], cache_dir)
    cache_dir.chmod(0o555)
    try:
        if not _refuses_files(cache_dir):
            pytest.skip("permission bits do not bind this user (root)")
        snapshot = _snapshot(cache_dir)
        result = _run(cache_dir, tmp_path / "read-only.json")
        assert not _cuqk_warnings(result)
        assert _snapshot(cache_dir) == snapshot
    finally:
        cache_dir.chmod(0o755)


if __name__ == "__main__":
    _child(*sys.argv[1:])
