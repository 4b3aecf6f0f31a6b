"""Shared test helpers: GPU detection, tolerances, input builders and the comparison."""

from __future__ import annotations

import numpy as np
import pytest

from cuqk.reference import TOLERANCES


def _gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


HAS_GPU = _gpu_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and torch with CUDA")


def inv_freq(rotary_dim: int, base: float = 10000.0) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)


def cos_sin_cache64(max_position: int, rotary_dim: int) -> np.ndarray:
    """float64 ``[max_position, rotary_dim]`` laid out ``[cos | sin]``."""
    angles = np.arange(max_position, dtype=np.float64)[:, None] * inv_freq(rotary_dim)[None]
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1)


def rel_l2(out, ref) -> float:
    """Relative L2 error of float64 arrays; inf if ``out`` has NaN or inf where ``ref`` has not."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    bad_out = ~np.isfinite(out)
    if np.any(bad_out != ~np.isfinite(ref)):
        return float("inf")
    keep = ~bad_out
    diff = np.linalg.norm((out - ref)[keep])
    norm = np.linalg.norm(ref[keep])
    return float(diff / norm) if norm else float(diff)


def assert_matches(out, ref, dtype: str, what: str) -> None:
    err = rel_l2(out, ref)
    assert err <= TOLERANCES[dtype], (
        f"{what}: relative L2 error {err:.3g} > {TOLERANCES[dtype]:g} ({dtype}); "
        f"worst element |diff| {np.nanmax(np.abs(np.asarray(out, np.float64) - ref)):.3g}"
    )
