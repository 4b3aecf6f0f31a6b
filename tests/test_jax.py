"""cuqk.qk_norm_rope on JAX arrays (cuqk.jax).

CPU part (JAX's CPU backend, where XLA's callback runs the float64 reference): eager and
jitted results against the reference, JAX work around the op, vmap, zero tokens, checks at
trace time, the debug check through XLA, the in-place refusal, the CuPy view of an XLA buffer
and the example.
GPU part (a CUDA GPU and JAX with a CUDA backend): the kernel on XLA's stream against the
float64 reference, eagerly and under jit, ordered with the JAX work before and after it, on a
second GPU, and replayed from an XLA command buffer (a CUDA graph) with new values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import HAS_GPU, TOLERANCES, assert_matches, cos_sin_cache64, requires_gpu

# JAX's GPU client takes 75% of the GPU's memory at start by default, which would starve the
# torch and CuPy tests sharing this process (and the subprocesses started below).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cuqk  # noqa: E402
import cuqk.jax as cuqk_jax  # noqa: E402
from cuqk import reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CPU = jax.devices("cpu")[0]


def _cuda_devices():
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


requires_jax_cuda = pytest.mark.skipif(not (HAS_GPU and _cuda_devices()),
                                       reason="needs a CUDA GPU and JAX with a CUDA backend")


def _case(dtype="float32", lead=(7,), hq=4, hk=2, d=64, rotary=None, max_position=64, seed=0,
          weight_dtype="float32", mrope=False):
    """Fresh random NumPy inputs: q, k, positions, q_weight, k_weight, cos_sin_cache."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    rotary = rotary or d
    pos_shape = (3, *lead) if mrope else lead
    return [rng.standard_normal((*lead, hq, d)).astype(dt),
            rng.standard_normal((*lead, hk, d)).astype(dt),
            rng.integers(0, max_position, pos_shape).astype(np.int32),
            (1 + 0.3 * rng.standard_normal(d)).astype(jnp.dtype(weight_dtype)),
            (1 + 0.3 * rng.standard_normal(d)).astype(jnp.dtype(weight_dtype)),
            cos_sin_cache64(max_position, rotary).astype(np.float32)]


def _reference(arrays, **flags):
    as64 = [None if a is None else np.asarray(a).astype(np.float64) for a in arrays]
    positions = None if arrays[2] is None else np.asarray(arrays[2])
    return reference.qk_norm_rope(as64[0], as64[1], positions, *as64[3:], **flags)


def _on(device, arrays):
    return [None if a is None else jax.device_put(a, device) for a in arrays]


def _assert_outputs(outs, refs, dtype, what, device):
    for name, out, ref in zip(("q_out", "k_out"), outs, refs):
        assert isinstance(out, jax.Array) and out.dtype == jnp.dtype(dtype)
        assert out.devices() == {device} and out.shape == ref.shape
        assert_matches(np.asarray(out).astype(np.float64), ref, dtype, f"{what} {name}")


def _eager(arrays, flags):
    return cuqk.qk_norm_rope(*arrays, **flags)


def _jitted(arrays, flags):
    return jax.jit(lambda *a: cuqk.qk_norm_rope(*a, **flags))(*arrays)


# ============================================================================ CPU part

CASES = {
    "neox_rms": ({}, {}),
    "gptj_gemma_partial_rotary": ({"rotary": 32}, {"is_neox": False, "norm": "gemma"}),
    "none_no_weights_no_positions": ({}, {"norm": "none", "weights": None, "positions": None}),
    "rope_first_weight_free": ({}, {"rope_first": True, "weights": None}),
    "mrope_interleaved": ({"mrope": True},
                          {"mrope_section": (16, 8, 8), "mrope_interleaved": True}),
}


def _build(case, dtype):
    shape, flags = CASES[case]
    flags = dict(flags)
    arrays = _case(dtype, weight_dtype=dtype, **shape)
    if flags.pop("weights", True) is None:
        arrays[3] = arrays[4] = None
    if flags.pop("positions", True) is None:
        arrays[2] = None
    return arrays, flags


@pytest.mark.parametrize("call", [_eager, _jitted], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_matches_reference(case, dtype, call):
    arrays, flags = _build(case, dtype)
    outs = call(_on(CPU, arrays), flags)
    _assert_outputs(outs, _reference(arrays, **flags), dtype, f"cpu {case}", CPU)


def test_cpu_inside_jit_between_jax_ops():
    q, k, positions, q_weight, k_weight, cache = _case(lead=(2, 5))

    @jax.jit
    def model(q, k):
        q_out, k_out = cuqk.qk_norm_rope(jnp.tanh(q), k * 2, positions, q_weight, k_weight,
                                         cache)
        return q_out * 3 + 1, k_out.sum(axis=-1)

    q_res, k_res = model(*_on(CPU, [q, k]))
    q_ref, k_ref = _reference([np.tanh(q), k * 2, positions, q_weight, k_weight, cache])
    assert_matches(np.asarray(q_res), q_ref * 3 + 1, "float32", "q through jit")
    assert_matches(np.asarray(k_res), k_ref.sum(axis=-1), "float32", "k through jit")


def test_cpu_vmap_runs_each_element():
    q, k, positions, q_weight, k_weight, cache = _case(lead=(3, 4))
    per_row = jax.vmap(lambda q, k, p: cuqk.qk_norm_rope(q, k, p, q_weight, k_weight, cache))
    outs = per_row(*_on(CPU, [q, k, positions]))
    refs = _reference([q, k, positions, q_weight, k_weight, cache])
    _assert_outputs(outs, refs, "float32", "vmap", CPU)


def test_cpu_zero_tokens_returns_empty_arrays():
    q, k, positions, *rest = _case(lead=(0, 3))
    q_out, k_out = cuqk.qk_norm_rope(*_on(CPU, [q, k, positions, *rest]))
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == q.dtype


def test_cpu_in_place_on_jax_raises_and_names_the_out_of_place_op():
    q, k, positions, q_weight, k_weight, cache = _on(CPU, _case())
    qkv = jnp.concatenate([q, k, k], axis=1).reshape(q.shape[0], -1)
    with pytest.raises(TypeError, match=r"qk_norm_rope(?!_)"):
        cuqk.qk_norm_rope_(qkv, positions, q_weight, k_weight, cache, num_q_heads=4,
                           num_kv_heads=2, head_dim=64)


def test_cpu_debug_check_reaches_the_caller_through_xla():
    q, k, positions, *rest = _case()
    positions[2] = 1000
    was = cuqk_jax._ops._debug
    cuqk.set_debug(True)
    try:
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"positions\[2\] = 1000"):
            jax.block_until_ready(cuqk.qk_norm_rope(*_on(CPU, [q, k, positions, *rest])))
    finally:
        cuqk.set_debug(was)


def test_cpu_grad_is_refused():
    q, k, *rest = _on(CPU, _case())
    with pytest.raises(ValueError, match="JVP"):
        jax.grad(lambda q: cuqk.qk_norm_rope(q, k, *rest)[0].sum())(q)


BAD = {
    "head_dim": (lambda a: [a[0][..., :40], a[1][..., :40], a[2], None, None, a[5][:, :40]],
                 {}, ValueError, "head_dim"),
    "k_dtype": (lambda a: [a[0], a[1].astype(jnp.bfloat16), *a[2:]], {}, TypeError, "k must"),
    "k_heads_dim": (lambda a: [a[0], a[1][..., :32], *a[2:]], {}, ValueError, "k must"),
    "positions_shape": (lambda a: [*a[:2], a[2][:3], *a[3:]], {}, ValueError, "positions"),
    "positions_dtype": (lambda a: [*a[:2], a[2].astype(np.float32), *a[3:]], {}, TypeError,
                        "positions"),
    "weight_shape": (lambda a: [*a[:3], a[3][:32], *a[4:]], {}, ValueError, "q_weight"),
    "cache_width": (lambda a: [*a[:5], a[5][:, :48]], {"rotary_dim": 64}, ValueError,
                    "cos_sin_cache"),
    "positions_list": (lambda a: [*a[:2], [0, 1], *a[3:]], {}, TypeError, "positions"),
    "no_cache": (lambda a: [*a[:5], None], {}, TypeError, "cos_sin_cache"),
    "norm": (lambda a: a, {"norm": "layer"}, ValueError, "norm"),
    "is_neox_int": (lambda a: a, {"is_neox": 1}, TypeError, "is_neox"),
    "mrope_sum": (lambda a: [*a[:2], np.stack([a[2]] * 3), *a[3:]],
                  {"mrope_section": [8, 8, 8]}, ValueError, "mrope_section"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cpu_bad_arguments_raise_at_trace_time(case):
    change, flags, error, name = BAD[case]
    arrays = [a if isinstance(a, (list, type(None))) else jax.device_put(a, CPU)
              for a in change(_case())]
    with pytest.raises(error, match=name):
        cuqk.qk_norm_rope(*arrays, **flags)
    # eval_shape only traces: the error comes from the trace, before anything runs.
    with pytest.raises(error, match=name):
        jax.eval_shape(lambda: cuqk.qk_norm_rope(*arrays, **flags))


def test_cpu_bad_shape_error_shows_the_real_shapes():
    q, k, *rest = _case(lead=(2, 5))
    with pytest.raises(ValueError, match=r"match q \(2, 5, 4, 64\), got \(2, 5, 2, 32\)"):
        cuqk.qk_norm_rope(*_on(CPU, [q, k[..., :32], *rest]))


def test_cpu_numpy_side_inputs_are_accepted():
    q, k, positions, q_weight, k_weight, cache = _case()
    outs = cuqk.qk_norm_rope(jax.device_put(q, CPU), k, positions, q_weight, k_weight, cache)
    _assert_outputs(outs, _reference([q, k, positions, q_weight, k_weight, cache]), "float32",
                    "numpy side inputs", CPU)


def test_cupy_view_of_an_xla_buffer_keeps_pointer_dtype_and_shape():
    # The GPU callback's view, on a stand-in buffer (building it makes no CUDA call).
    class Buffer:
        dtype = jnp.dtype("bfloat16")
        shape = (3, 4, 64)
        __cuda_array_interface__ = {"data": (1 << 20, False), "shape": shape, "typestr": "<V2",
                                    "version": 3}

    view = cuqk_jax._cupy_view(Buffer(), 0)
    assert view.data.ptr == 1 << 20 and view.dtype.name == "bfloat16"
    assert view.shape == (3, 4, 64) and view.strides == (512, 128, 2)


def _run_example(env=None):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "jax_rope.py")], cwd=ROOT,
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_example_runs_on_the_cpu():
    proc = _run_example({"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cpu, float32") and "match the plain JAX prologue" in proc.stdout


# ============================================================================ GPU part


@requires_gpu
@requires_jax_cuda
@pytest.mark.parametrize("call", [_eager, _jitted], ids=["eager", "jit"])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_matches_reference(dtype, is_neox, call):
    arrays = _case(dtype, lead=(33,), hq=8, hk=2, d=128, max_position=4096, seed=3,
                   weight_dtype=dtype)
    flags = {"is_neox": is_neox}
    gpu = _cuda_devices()[0]
    outs = call(_on(gpu, arrays), flags)
    _assert_outputs(outs, _reference(arrays, **flags), dtype, f"gpu {call.__name__}", gpu)


@requires_gpu
@requires_jax_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_flag_cases(case):
    arrays, flags = _build(case, "bfloat16")
    gpu = _cuda_devices()[0]
    outs = _jitted(_on(gpu, arrays), flags)
    _assert_outputs(outs, _reference(arrays, **flags), "bfloat16", f"gpu {case}", gpu)


def _projection_inputs(tokens=2048, hidden=2048, heads=8, d=128):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    w = (rng.standard_normal((hidden, heads * d)) / hidden**0.5).astype(np.float32)
    positions = rng.integers(0, 4096, tokens).astype(np.int32)
    cache = cos_sin_cache64(4096, d).astype(np.float32)
    return x, w, positions, cache, heads, d


@requires_gpu
@requires_jax_cuda
def test_gpu_ordered_with_jax_work_inside_one_jit():
    # A large matmul makes q just before the op and an elementwise op reads its result just
    # after: any missing ordering would show as stale or unfinished values.
    x, w, positions, cache, heads, d = _projection_inputs()
    gpu = _cuda_devices()[0]

    @jax.jit
    def model(x, w, positions, cache):
        q = (x @ w).reshape(x.shape[0], heads, d)
        q_out, k_out = cuqk.qk_norm_rope(q, q[:, :2], positions, None, None, cache)
        return q, q_out * 2 + 1, k_out * 2

    q, q_res, k_res = model(*_on(gpu, [x, w, positions, cache]))
    q_ref, k_ref = _reference([q, np.asarray(q)[:, :2], positions, None, None, cache])
    assert_matches(np.asarray(q_res), q_ref * 2 + 1, "float32", "q after the op")
    assert_matches(np.asarray(k_res), k_ref * 2, "float32", "k after the op")


@requires_gpu
@requires_jax_cuda
def test_gpu_ordered_with_jax_work_eagerly():
    x, w, positions, cache, heads, d = _projection_inputs()
    x, w, positions, cache = _on(_cuda_devices()[0], [x, w, positions, cache])
    q = jax.jit(lambda x, w: (x @ w).reshape(x.shape[0], heads, d))(x, w)  # still running
    q_out, k_out = cuqk.qk_norm_rope(q, q[:, 2:5], positions, None, None, cache)
    q_res = q_out - 1
    q_ref, k_ref = _reference([q, q[:, 2:5], positions, None, None, cache])
    assert_matches(np.asarray(q_res), q_ref - 1, "float32", "eager q")
    assert_matches(np.asarray(k_out), k_ref, "float32", "eager k")


@requires_gpu
@requires_jax_cuda
def test_gpu_second_device():
    devices = _cuda_devices()
    if len(devices) < 2:
        pytest.skip("needs two GPUs")
    arrays = _case("bfloat16", lead=(9,), d=128, weight_dtype="bfloat16")
    outs = cuqk.qk_norm_rope(*_on(devices[1], arrays))
    _assert_outputs(outs, _reference(arrays), "bfloat16", "cuda:1", devices[1])


# Runs in its own process: XLA reads its flags once, at backend start.
_COMMAND_BUFFER_SCRIPT = r"""
import json
import numpy as np
import jax
import jax.numpy as jnp
import cuqk
import cuqk.jax
from cuqk import reference

runs = []
launch = cuqk.jax._run_gpu


def counted(*args):
    runs.append(1)
    launch(*args)


cuqk.jax._run_gpu = counted
tokens, heads, d = 64, 8, 128
cache = jnp.asarray(cuqk.rope_cos_sin_cache(1024, d))


@jax.jit
def step(x, offset):
    # q, positions and the outputs live in XLA's temporary buffers, at the same addresses in
    # every run, so a captured graph can be replayed as it is.
    q = jnp.tanh(x).astype(jnp.bfloat16)
    positions = offset + jnp.arange(tokens, dtype=jnp.int32)
    q_out, k_out = cuqk.qk_norm_rope(q, q[:, :2], positions, None, None, cache)
    return q, positions, q_out.astype(jnp.float32) * 2, k_out.astype(jnp.float32) * 2


errors = []
for i in range(5):
    x = jax.random.normal(jax.random.key(i), (tokens, heads, d))
    q, positions, q_out, k_out = step(x, jnp.int32(7 * i))
    q64 = np.asarray(q).astype(np.float64)
    refs = reference.qk_norm_rope(q64, q64[:, :2], np.asarray(positions), None, None,
                                  np.asarray(cache).astype(np.float64))
    for out, ref in zip((q_out, k_out), refs):
        out = np.asarray(out, np.float64)
        errors.append(float(np.linalg.norm(out - 2 * ref) / np.linalg.norm(2 * ref))
                      if np.all(np.isfinite(out)) else float("inf"))
print(json.dumps({"runs": len(runs), "calls": 5, "worst": max(errors)}))
"""


@requires_gpu
@requires_jax_cuda
def test_gpu_command_buffer_replays_with_new_values():
    flags = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
    proc = subprocess.run([sys.executable, "-c", _COMMAND_BUFFER_SCRIPT], cwd=ROOT,
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": flags})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["worst"] <= TOLERANCES["bfloat16"], result
    # Fewer Python runs than calls means XLA replayed a captured graph; how many is XLA's call.
    warnings.warn(f"cuqk's JAX callback ran {result['runs']} times for {result['calls']} calls "
                  "under XLA command buffers", stacklevel=1)


@requires_gpu
@requires_jax_cuda
def test_gpu_example_runs():
    proc = _run_example()
    # The example checks its numbers against the plain JAX prologue itself.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu, bfloat16"), proc.stdout
