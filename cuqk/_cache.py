"""Compiling and loading one kernel: through CuPy's disk cache, or in memory when it fails.

CuPy keeps compiled kernels in ``CUPY_CACHE_DIR`` (default ``~/.cupy/kernel_cache``). Each entry
carries a SHA-1 of its contents and is written to a temporary file that is then renamed into
place, so concurrent writers and truncated or corrupted entries are already safe: a bad entry
reads as a miss and is compiled and written again. What CuPy does not survive is a directory
it cannot write (or an entry it cannot read): the compile succeeds, then saving it raises.
cuqk then compiles the kernel with NVRTC itself and keeps it in memory for the rest of the
process, warning once.

Reading back an entry built with ``name_expressions`` (each cuqk kernel is a template
instance) works from CuPy 14.2; older versions write the entry but compile again in every
process.
"""

from __future__ import annotations

import os
import warnings

import cupy
from cupy.cuda import compiler as cupy_compiler
from cupy_backends.cuda.api import driver, runtime
from cupy_backends.cuda.libs import nvrtc

# CuPy adds this flag to every NVRTC build; passing it here too keeps a kernel built in memory
# identical in behaviour to the one CuPy caches.
CUPY_IMPLICIT_OPTIONS = ("-ftz=true",)

_memory_only = False


def cupy_cache_dir() -> str:
    """The directory CuPy's kernel cache uses in this process."""
    # CuPy reads CUPY_CACHE_DIR once, when it is imported; its backend knows the one in use.
    backend = getattr(cupy_compiler, "_kernel_cache_backend", None)
    return getattr(backend, "_cache_dir", None) or os.environ.get(
        "CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))


def nvrtc_target(compute_capability: int, supported: tuple) -> tuple[str, bool]:
    """NVRTC's ``--gpu-architecture`` for a device, and whether it yields PTX.

    A cubin when NVRTC knows the device; otherwise PTX for the newest architecture NVRTC knows
    that the device can run, which the driver compiles at load.
    """
    if compute_capability in supported:
        return f"--gpu-architecture=sm_{compute_capability}", False
    older = [a for a in supported if a <= compute_capability]
    if not older:
        raise RuntimeError(
            f"NVRTC (architectures {supported}) cannot build for compute capability "
            f"{compute_capability}"
        )
    return f"--gpu-architecture=compute_{max(older)}", True


def nvrtc_image(source: str, expression: str, options: tuple, target: str,
                ptx: bool) -> tuple[bytes, str]:
    """Compile ``expression`` (a template instance in ``source``) with NVRTC.

    Returns the cubin (or PTX) and the instance's mangled name. Needs no GPU.
    """
    prog = nvrtc.createProgram(source, "cuqk_kernel.cu", (), ())
    try:
        nvrtc.addNameExpression(prog, expression)
        try:
            nvrtc.compileProgram(prog, (*options, target))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"{expression} ({target}):\n{nvrtc.getProgramLog(prog)}") from exc
        lowered = nvrtc.getLoweredName(prog, expression)
        return (nvrtc.getPTX(prog) if ptx else nvrtc.getCUBIN(prog)), lowered
    finally:
        nvrtc.destroyProgram(prog)


class MemoryKernel:
    """A kernel compiled by NVRTC and loaded on the current device, bypassing the disk cache.

    Its module is never unloaded: like CuPy's cached kernels it lives as long as the process.
    """

    def __init__(self, source: str, expression: str, options: tuple):
        capability = int(cupy.cuda.Device().compute_capability)
        target, ptx = nvrtc_target(capability, tuple(nvrtc.getSupportedArchs()))
        image, lowered = nvrtc_image(
            source, expression, (*options, *CUPY_IMPLICIT_OPTIONS), target, ptx)
        # cudaFree(0) binds the device's primary context to this thread if nothing has yet (as
        # CuPy does before it loads a module); the driver call below needs one.
        runtime.free(0)
        self.module = driver.moduleLoadData(image)
        self.ptr = driver.moduleGetFunction(self.module, lowered)

    @property
    def num_regs(self) -> int:
        return driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_NUM_REGS, self.ptr)

    @property
    def local_size_bytes(self) -> int:
        return driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, self.ptr)


def load_kernel(source: str, expression: str, options: tuple):
    """Compile (or load from CuPy's cache) one template instance on the current device.

    Returns ``(kernel, CUfunction handle)``; ``kernel`` (a ``cupy.RawKernel`` or a
    ``MemoryKernel``) owns the handle and reports ``num_regs`` and ``local_size_bytes``.
    The first time the cache fails with an ``OSError`` this warns once and from then on
    compiles every kernel of this process in memory. Callers serialise calls.
    """
    global _memory_only
    if not _memory_only:
        try:
            kernel = cupy.RawModule(
                code=source, options=options, name_expressions=[expression]
            ).get_function(expression)
            return kernel, kernel.kernel.ptr
        except OSError as exc:
            _memory_only = True
            warnings.warn(
                f"cuqk: CuPy's kernel cache directory {cupy_cache_dir()} is not usable "
                f"({exc}); kernels are compiled in memory and will be compiled again by every "
                "new process. Point CUPY_CACHE_DIR at a writable directory to keep them.",
                RuntimeWarning, stacklevel=2)
    kernel = MemoryKernel(source, expression, options)
    return kernel, kernel.ptr
