"""Registers and spills of every kernel variant, without a GPU: NVRTC to PTX, then `ptxas -v`.

    PYTHONPATH=. python3 scripts/kernel_resources.py [sm_90]

The last column is a hash of each variant's cubin (ptxas output is deterministic): a change
that leaves every hash as it was leaves the machine code as it was, which needs no GPU run.

Needs `ptxas` on the PATH (or in /usr/local/cuda/bin). On a GPU, `python -m cuqk precompile`
reports the same from the loaded kernels.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

from cuqk import _jit


def main(arch="sm_90"):
    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        for variant in _jit.VARIANTS:
            path = os.path.join(tmp, variant.name + ".ptx")
            with open(path, "wb") as f:
                f.write(_jit.compile_offline(variant, arch, ptx=True))
            cubin = os.path.join(tmp, variant.name + ".cubin")
            log = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", cubin],
                                 capture_output=True, text=True, check=True).stderr
            with open(cubin, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()[:12]
            regs = re.search(r"Used (\d+) registers", log)
            spill = re.search(r"(\d+) bytes spill stores", log)
            print(f"{variant.name:<45} {regs.group(1) if regs else '?':>4} registers, "
                  f"{spill.group(1) if spill else '?'} B spill stores, cubin {digest}")


if __name__ == "__main__":
    main(*sys.argv[1:])
