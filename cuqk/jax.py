"""cuqk on JAX arrays: ``qk_norm_rope`` as one XLA custom call, eagerly and inside ``jax.jit``.

``cuqk.qk_norm_rope`` hands JAX arrays (and tracers) to ``qk_norm_rope`` here. The op is a
``jax.experimental.buffer_callback``: XLA allocates the outputs and, when the computation runs,
calls back into Python with its own buffers and its own stream. On a GPU the buffers are wrapped
as CuPy arrays without a copy and ``cuqk.qk_norm_rope(..., out=...)`` launches the kernel on
XLA's stream, so the op is ordered with the JAX work before and after it like any XLA op, with
no synchronisation. On a CPU backend the same callback runs the float64 reference
(``cuqk.reference``) on NumPy views of the buffers.

Arguments are checked when the function is traced, by cuqk's own checks run on small NumPy
stand-ins, so a bad argument raises at the call (inside ``jit``: while tracing) with the op's
own message naming it. The callback is declared command-buffer compatible: all it does on the
device is launch one kernel on the stream it is given (no allocation, no synchronisation, and
the kernel depends only on the buffers' addresses and the traced shapes), so XLA may capture it
into a CUDA graph and replay it. Since capture forbids compiling, the kernel variant is compiled
at trace time.

Limits: out of place only (JAX arrays are immutable); no autodiff (JAX refuses to differentiate
a buffer callback); under ``jax.vmap`` the callback runs once per batch element.
"""

from __future__ import annotations

import functools
import importlib
import math

import cupy
import jax
import jax.numpy as jnp
import numpy as np

try:
    from jax.experimental.buffer_callback import buffer_callback
except ImportError as exc:  # pragma: no cover - depends on the installed JAX
    raise ImportError(
        f"cuqk's JAX support needs jax.experimental.buffer_callback, which JAX {jax.__version__} "
        "lacks; upgrade JAX (tested with 0.10 and 0.11)"
    ) from exc

from . import _interop

# The package attribute cuqk.qk_norm_rope is the function; the module holds the debug switch.
_ops = importlib.import_module(".qk_norm_rope", __package__)

_ARGUMENT_NAMES = ("q", "k", "positions", "q_weight", "k_weight", "cos_sin_cache")
_OPTIONAL = ("positions", "q_weight", "k_weight")
_DLPACK_CPU = 1
_MAX_CACHED = 256


def qk_norm_rope(q, k, positions, q_weight, k_weight, cos_sin_cache, *, eps=1e-6, is_neox=True,
                 rotary_dim=None, norm="rms", rope_first=False, mrope_section=None,
                 mrope_interleaved=False):
    """``cuqk.qk_norm_rope`` on JAX arrays: new ``(q_out, k_out)`` jax.Arrays.

    Parameters
    ----------
    q, k : ``[..., Hq, D]`` and ``[..., Hk, D]``, one dtype of float16, bfloat16, float32, on a
        CUDA device (the kernel) or the CPU (the float64 reference).
    positions : int32 or int64 of shape ``q.shape[:-2]`` (``(3, *q.shape[:-2])`` with
        ``mrope_section``), or None: token t, row-major over the leading dims, reads cache row t.
    q_weight, k_weight : ``[D]`` in q's dtype or float32, or None for no weight.
    cos_sin_cache : ``[max_position, rotary_dim]`` float32, float16 or bfloat16, ``[cos | sin]``.
    eps, is_neox, rotary_dim, norm, rope_first, mrope_section, mrope_interleaved :
        as in ``cuqk.qk_norm_rope_``.

    Arguments may also be NumPy arrays (converted with ``jnp.asarray``). Eager calls go through
    a cached ``jax.jit`` of the op; inside ``jax.jit`` the op is one custom call in the traced
    computation. Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument when
    the call is traced, before anything runs.

    Returns
    -------
    ``(q_out, k_out)``: jax.Arrays of q's and k's shapes and dtype, on their device.
    """
    # A list would make the flags unhashable, and jit caches on them.
    if isinstance(mrope_section, list):
        mrope_section = tuple(mrope_section)
    flags = {"eps": eps, "is_neox": is_neox, "rotary_dim": rotary_dim, "norm": norm,
             "rope_first": rope_first, "mrope_section": mrope_section,
             "mrope_interleaved": mrope_interleaved}
    arrays = [_as_jax(name, a) for name, a in
              zip(_ARGUMENT_NAMES, (q, k, positions, q_weight, k_weight, cos_sin_cache))]
    return _jitted(flags)(*arrays)


def _as_jax(name, x):
    if _interop.is_jax(x) or (x is None and name in _OPTIONAL):
        return x
    if isinstance(x, np.ndarray):
        return jnp.asarray(x)
    kind = "None" if x is None else f"{type(x).__module__}.{type(x).__qualname__}"
    allowed = "a jax.Array, a NumPy array or None" if name in _OPTIONAL else \
        "a jax.Array or a NumPy array"
    raise TypeError(f"{name} must be {allowed} in a call on JAX arrays, got {kind}")


def _flags_key(flags):
    # Types too: True == 1 == 1.0, and a mistyped flag must reach the checks, not a cached trace.
    return tuple((value, type(value)) for value in flags.values())


_jitted_by_flags: dict = {}


def _jitted(flags):
    """``jax.jit`` of the op for one set of flags, cached so an eager call is one dispatch."""
    # The debug switch changes the traced call (see _traced), so a trace is kept per setting.
    key = (_flags_key(flags), _ops._debug)
    try:
        fn = _jitted_by_flags.get(key)
    except TypeError:  # an unhashable flag: trace afresh and let the checks name it
        return jax.jit(functools.partial(_traced, flags))
    if fn is None:
        if len(_jitted_by_flags) >= _MAX_CACHED:
            _jitted_by_flags.clear()
        fn = _jitted_by_flags[key] = jax.jit(functools.partial(_traced, flags))
    return fn


def _traced(flags, *arrays):
    q, k = arrays[:2]
    shapes = [None if a is None else tuple(a.shape) for a in arrays]
    dtypes = [None if a is None else a.dtype for a in arrays]
    # cuqk's checks on stand-ins without tokens: they compute nothing but raise what the real
    # call would, here at trace time rather than from inside XLA. A failure is raised again from
    # stand-ins of the real shapes, so that the message shows those.
    try:
        _ops.qk_norm_rope(*_check_stand_ins(_token_shapes(shapes, 0), dtypes), **flags)
    except (TypeError, ValueError):
        _ops.qk_norm_rope(*_check_stand_ins(shapes, dtypes), **flags)
        raise
    if math.prod(q.shape[:-2]) == 0:
        return jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, k.dtype)
    # The debug check reads positions back to the host, which no CUDA graph may hold.
    capturable = not _ops._debug
    if capturable:
        _compile_ahead(flags, _token_shapes(shapes, 1), dtypes)
    call = buffer_callback(
        functools.partial(_callback, flags),
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)),
        vmap_method="sequential", command_buffer_compatible=capturable)
    return call(*arrays)


def _token_shapes(shapes, tokens):
    """The argument shapes with the leading (token) dims folded into one of ``tokens`` and the
    cache cut to one row, neither of which changes what the checks or the kernel variant
    depend on. Shapes whose leading dims disagree are kept (the checks will refuse them).
    """
    q, k, positions, q_weight, k_weight, cache = shapes
    if len(cache) == 2 and cache[0] > 1:
        cache = (1, cache[1])
    kept = [q, k, positions, q_weight, k_weight, cache]
    if len(q) < 2 or len(k) < 2 or k[:-2] != q[:-2] or not q[:-2]:
        return kept
    extra = None if positions is None else len(positions) - len(q[:-2])
    if positions is not None and (extra < 0 or positions[extra:] != q[:-2]):
        return kept
    return [(tokens, *q[-2:]), (tokens, *k[-2:]),
            None if positions is None else (*positions[:extra], tokens),
            q_weight, k_weight, cache]


def _check_stand_ins(shapes, dtypes):
    # One zero row broadcast over the other dims: the checks see the shape, the dtype and a
    # contiguous last dim, without memory for a whole array of a real (possibly large) shape.
    return [None if s is None else np.broadcast_to(np.zeros(s[-1:], d), s)
            for s, d in zip(shapes, dtypes)]


def _cuda_devices():
    try:
        return [d.local_hardware_id for d in jax.local_devices(backend="cuda")]
    except RuntimeError:  # this JAX has no CUDA backend
        return []


_compiled_ahead: set = set()


def _compile_ahead(flags, shapes, dtypes):
    """Compile the kernel variant this call needs on each local CUDA device, by running the op
    once on one-token CuPy stand-ins (CuPy allocations are aligned as XLA's, so the variant is
    the one the callback will pick). XLA may run the callback first inside a CUDA-graph
    capture, where cuqk refuses to compile."""
    key = (_flags_key(flags), tuple(shapes), tuple(str(d) for d in dtypes))
    for device in _cuda_devices():
        if (key, device) in _compiled_ahead:
            continue
        with cupy.cuda.Device(device):
            arrays = [None if s is None else _device_zeros(s, d) for s, d in zip(shapes, dtypes)]
            _ops.qk_norm_rope(*arrays, **flags, out=(_device_zeros(shapes[0], dtypes[0]),
                                                     _device_zeros(shapes[1], dtypes[1])))
        if len(_compiled_ahead) >= _MAX_CACHED:
            _compiled_ahead.clear()
        _compiled_ahead.add((key, device))


def _device_zeros(shape, dtype):
    # Zero bytes viewed as the dtype: CuPy's constructors are not sure to take bfloat16.
    raw = cupy.zeros(math.prod(shape) * dtype.itemsize, cupy.uint8)
    return cupy.ndarray(shape, dtype, raw.data)


def _callback(flags, ctx, outs, *buffers):
    """What XLA runs: ``buffers`` are the inputs (None where not given), ``outs`` q_out, k_out."""
    kind, device = buffers[0].__dlpack_device__()
    if kind == _DLPACK_CPU:
        _ops.qk_norm_rope(*[None if b is None else np.asarray(b) for b in buffers], **flags,
                          out=tuple(np.asarray(o) for o in outs))
    else:
        _run_gpu(ctx.stream, device, flags, buffers, outs)


def _run_gpu(stream, device, flags, buffers, outs):
    with cupy.cuda.Device(device), _cupy_stream(stream, device):
        _ops.qk_norm_rope(*[None if b is None else _cupy_view(b, device) for b in buffers],
                          **flags, out=tuple(_cupy_view(o, device) for o in outs))


def _cupy_view(buffer, device):
    """A CuPy array over an XLA buffer's memory, no copy. XLA hands custom calls dense
    row-major buffers; the dtype comes from ``buffer.dtype`` because CUDA array interface type
    strings cannot name bfloat16."""
    dtype = buffer.dtype
    shape = buffer.shape
    pointer = buffer.__cuda_array_interface__["data"][0]
    memory = cupy.cuda.UnownedMemory(pointer, math.prod(shape) * dtype.itemsize, buffer, device)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))


class _StreamHandle:
    """A raw CUDA stream handle with the CUDA stream protocol (``Stream.from_external``)."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


# Never emptied: XLA makes a few streams per device and keeps them, and a collected CuPy Stream
# destroys the stream it wraps unless it is marked foreign, which from_external has not done in
# every CuPy source version; XLA's streams must outlive every wrapper.
_streams: dict = {}


def _cupy_stream(handle, device):
    """A CuPy stream object for XLA's stream ``handle`` (call with ``device`` current)."""
    stream = _streams.get((handle, device))
    if stream is None:
        if hasattr(cupy.cuda.Stream, "from_external"):
            stream = cupy.cuda.Stream.from_external(_StreamHandle(handle))
        else:  # CuPy 13
            stream = cupy.cuda.ExternalStream(handle, device)
        _streams[(handle, device)] = stream
    return stream
