"""The one compiled part of hubmerge: the merge diagnostics' single-pass kernel (hubmerge/_kernels.c).

Optional: without a C compiler the build goes on without it, and the diagnostics take their torch path
(hubmerge/quality/kernel.py loads it; a merge without it says so in one line). Everything else about the
package is in pyproject.toml.
"""

import sys

from setuptools import Extension, setup

# -O3 for the compiler's work on the vector loop; no -ffast-math: the kernel's NaN tests and its
# float32 roundings must stay IEEE's.
flags = [] if sys.platform == "win32" else ["-O3", "-std=c99", "-fno-strict-aliasing"]

setup(
    ext_modules=[
        Extension("hubmerge._kernels", ["hubmerge/_kernels.c"], extra_compile_args=flags, optional=True)
    ]
)
