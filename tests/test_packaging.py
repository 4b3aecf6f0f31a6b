"""Packaging: a built wheel carries the kernels and finds them; import needs CuPy; examples run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not (ROOT / "setup.cfg").is_file(), reason="not a source checkout")
def test_wheel_install_finds_its_kernels(tmp_path):
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT))
    wheel = next((tmp_path / "dist").glob("cuqk-*.whl"))
    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel))
    # A fresh interpreter that sees the installed wheel and not the source checkout.
    out = subprocess.run(
        [sys.executable, "-c", ("import cuqk, cuqk._jit as j; print(j.KERNEL_DIR); "
                                "print(len(j.load_source('qk_norm_rope')))")],
        cwd=tmp_path, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(site)}).stdout
    kernel_dir, length = out.split()
    assert Path(kernel_dir) == site / "cuqk" / "kernels_cu" and int(length) > 1000


def test_import_without_cupy_names_the_extra():
    code = "import sys; sys.modules['cupy'] = None; import cuqk"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode != 0
    assert "cuqk[cuda12]" in proc.stderr and "cuqk[cuda13]" in proc.stderr


def test_import_compiles_nothing():
    code = ("import cuqk, cuqk._jit as j; assert not j.compiled_variants(); "
            "import sys; assert 'torch' not in sys.modules and 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(example):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(example)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 0, proc.stderr
