"""What cuqk needs to know about a caller's arrays: framework, geometry, pointer, stream.

Supported: torch tensors and CuPy arrays (CUDA: the kernels; CPU torch: the reference) and
NumPy arrays (the reference). JAX arrays take their own path (``cuqk.jax``, an XLA callback
that calls back into cuqk with CuPy or NumPy views); ``is_jax`` tells them apart without
importing JAX. Torch and JAX are never imported here unless the caller's arrays come from them.

Each framework gets a ``key`` function: a cheap tuple of everything a launch plan depends on
(shape, strides, dtype, device, pointer alignment). Plans are cached on it, so the per-call
cost is a few attribute reads instead of DLPack capsules and validation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CPU = -1


class ArrayInfo(NamedTuple):
    framework: str
    shape: tuple
    strides: tuple  # in elements
    dtype: str  # "bfloat16", "float32", "int64", ... (the framework's name when unknown)
    device: int  # CUDA ordinal, or CPU
    ptr: int
    requires_grad: bool = False


_JAX_MODULES = ("jax", "jaxlib")
_IS_JAX_BY_TYPE: dict[type, bool] = {}


def is_jax(x) -> bool:
    """Whether ``x`` is a JAX array or tracer, judged by its type's module (JAX not imported)."""
    cls = type(x)
    answer = _IS_JAX_BY_TYPE.get(cls)
    if answer is None:
        answer = _IS_JAX_BY_TYPE[cls] = cls.__module__.split(".")[0] in _JAX_MODULES
    return answer


def _framework_of_type(cls) -> str:
    module = cls.__module__.split(".")[0]
    if module == "torch":
        return "torch"
    if module == "cupy":
        return "cupy"
    if issubclass(cls, np.ndarray):
        return "numpy"
    if module in _JAX_MODULES:
        # qk_norm_rope catches this TypeError and hands JAX arrays to cuqk.jax.
        raise TypeError(
            f"got a JAX array ({cls.__module__}.{cls.__qualname__}): JAX arrays are immutable, so "
            "only the out-of-place cuqk.qk_norm_rope takes them, and only when q is a JAX array"
        )
    raise TypeError(
        f"expected a torch.Tensor, cupy.ndarray or numpy.ndarray, got {cls.__module__}."
        f"{cls.__qualname__}"
    )


_FRAMEWORK_BY_TYPE: dict[type, str] = {}


def framework(x) -> str:
    cls = type(x)
    name = _FRAMEWORK_BY_TYPE.get(cls)
    if name is None:
        name = _FRAMEWORK_BY_TYPE[cls] = _framework_of_type(cls)
    return name


def _torch_key(x):
    return (x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() & 15, x.requires_grad)


def _cupy_key(x):
    return (x.shape, x.strides, x.dtype, x.device.id, x.data.ptr & 15)


def _numpy_key(x):
    return (x.shape, x.strides, x.dtype, CPU, x.ctypes.data & 15)


def _cupy_pointer(x):
    return x.data.ptr


def _numpy_pointer(x):
    return x.ctypes.data


_KEYS = {"torch": _torch_key, "cupy": _cupy_key, "numpy": _numpy_key}
_KEY_BY_TYPE = {type(None): lambda x: None}


def key_function(framework_name: str):
    """``key`` for arrays of one framework, without the dispatch on type: what a caller that
    knows the framework uses on its per-call path. Other arrays raise AttributeError."""
    return _KEYS[framework_name]


def pointer_function(framework_name: str):
    """A function array -> data pointer (bytes) for arrays of one framework."""
    if framework_name == "torch":
        import torch

        # The C method itself: no Python frame around it on the per-call path.
        return torch.Tensor.data_ptr
    return {"cupy": _cupy_pointer, "numpy": _numpy_pointer}[framework_name]


def key(x):
    """Hashable summary of ``x`` for the plan cache (shape, strides, dtype, device, alignment).

    Keys of different frameworks never compare equal (their dtype objects or devices differ).
    """
    try:
        return _KEY_BY_TYPE[type(x)](x)
    except KeyError:
        _KEY_BY_TYPE[type(x)] = _KEYS[framework(x)]
        return _KEY_BY_TYPE[type(x)](x)


def info(x) -> ArrayInfo:
    name = framework(x)
    if name == "torch":
        dtype = str(x.dtype).removeprefix("torch.")
        return ArrayInfo(name, tuple(x.shape), tuple(x.stride()), dtype, x.get_device(),
                         x.data_ptr(), x.requires_grad)
    itemsize = x.dtype.itemsize
    strides = tuple(s // itemsize for s in x.strides)
    if name == "cupy":
        return ArrayInfo(name, x.shape, strides, x.dtype.name, x.device.id, x.data.ptr)
    return ArrayInfo(name, x.shape, strides, x.dtype.name, CPU, x.ctypes.data)


def _torch_stream_getter():
    import torch

    # The private getter returns the raw handle in about 0.1 us; the public one builds a Stream.
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return getter or (lambda device: torch.cuda.current_stream(device).cuda_stream)


def _cupy_stream(device: int) -> int:
    import cupy

    if cupy.cuda.runtime.getDevice() == device:
        return cupy.cuda.get_current_stream().ptr
    with cupy.cuda.Device(device):
        return cupy.cuda.get_current_stream().ptr


def stream_getter(framework_name: str):
    """A function device -> raw handle of the caller's current stream there, per framework."""
    return _torch_stream_getter() if framework_name == "torch" else _cupy_stream


def grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def empty(framework_name: str, shape, like):
    """A new contiguous array of ``like``'s dtype and device."""
    if framework_name == "torch":
        import torch

        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if framework_name == "cupy":
        import cupy

        with like.device:
            return cupy.empty(shape, dtype=like.dtype)
    return np.empty(shape, dtype=like.dtype)


def to_float64(x):
    """A float64 NumPy copy of a CPU array (torch bfloat16 included); None stays None."""
    if x is None:
        return None
    if framework(x) == "torch":
        import torch

        return x.detach().to(dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def to_numpy(x):
    """A NumPy view or copy of a CPU array of any dtype NumPy has (positions, ints)."""
    if framework(x) == "torch":
        return x.detach().numpy()
    return np.asarray(x)


def _float32_round_to_odd(values):
    """float64 -> float32 rounded to odd: a later round-to-nearest to a type of at most 22
    significant bits (float16, bfloat16) then equals one rounding from float64."""
    with np.errstate(over="ignore"):  # beyond float32's range: inf, fixed up below
        f32 = values.astype(np.float32)
    inexact = (f32.astype(np.float64) != values) & np.isfinite(values)
    # Round toward zero first, then mark inexact results by setting the last bit.
    away = inexact & (np.abs(f32.astype(np.float64)) > np.abs(values))
    f32 = np.where(away, np.nextafter(f32, np.float32(0)), f32)
    return (f32.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)


def write_from_float64(dst, values) -> None:
    """Round float64 ``values`` once to ``dst``'s dtype and store them into ``dst`` (CPU)."""
    if framework(dst) == "torch":
        import torch

        # torch converts float64 to 16-bit types through float32: two roundings. Rounding to
        # odd in that first step makes the pair equal one rounding.
        if dst.dtype in (torch.float16, torch.bfloat16):
            values = _float32_round_to_odd(values)
        dst.copy_(torch.from_numpy(np.ascontiguousarray(values)).to(dst.dtype))
    else:
        dst[...] = values.astype(dst.dtype)
