"""Registers and spills of every kernel variant, without a GPU: NVRTC to PTX, then `ptxas -v`.

    PYTHONPATH=. python3 scripts/kernel_resources.py [sm_90]

Needs `ptxas` on the PATH (or in /usr/local/cuda/bin). On a GPU, `python -m cuqk precompile`
reports the same from the loaded kernels.
"""

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
            log = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
            regs = re.search(r"Used (\d+) registers", log)
            spill = re.search(r"(\d+) bytes spill stores", log)
            print(f"{variant.name:<45} {regs.group(1) if regs else '?':>4} registers, "
                  f"{spill.group(1) if spill else '?'} B spill stores")


if __name__ == "__main__":
    main(*sys.argv[1:])
