"""Build of the optional native kernels (rgemma/ops/_native.c); everything else is in
pyproject.toml. The extension is optional: without a working C compiler (GCC or
Clang with OpenMP) the install still succeeds and rgemma runs its pure-torch kernels
(`rgemma.ops.native.available()`, `unavailable_reason()`). x86-64 only (the kernels
are AVX-512 / AVX2 with a portable C path chosen at run time)."""

import platform

from setuptools import Extension, setup

X86_64 = platform.machine().lower() in ("x86_64", "amd64")

setup(
    ext_modules=[
        Extension(
            "rgemma.ops._native",
            sources=["src/rgemma/ops/_native.c"],
            extra_compile_args=["-O3", "-fopenmp", "-std=c11"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
    if X86_64 and platform.system() != "Windows"
    else []
)
