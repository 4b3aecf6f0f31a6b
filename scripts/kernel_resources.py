"""Registers and local memory (spills) of every kernel variant, without a GPU: NVRTC's cubin.

    PYTHONPATH=. python3 scripts/kernel_resources.py [sm_90]

The figures are the ones the driver reports for the loaded kernel (`python -m cuqk precompile`
prints them on a GPU). The last column is a hash of each variant's cubin, which NVRTC builds
deterministically: a change that leaves every hash as it was leaves the machine code as it
was, and needs no GPU run to show it.
"""

import hashlib
import sys

from cuqk import _jit


def main(arch="sm_90"):
    for variant in _jit.VARIANTS:
        cubin = _jit.compile_offline(variant, arch)
        registers, local = _jit.cubin_resources(cubin)
        digest = hashlib.sha1(cubin).hexdigest()[:12]
        print(f"{variant.name:<52} {registers:>4} registers, {local:>4} B local, cubin {digest}")


if __name__ == "__main__":
    main(*sys.argv[1:])
