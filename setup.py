"""Build of the optional native kernels (rgemma/ops/_native.c); everything else is in
pyproject.toml. The extension is optional: without a C compiler the install still
succeeds and rgemma runs its pure-torch kernels (`rgemma.ops.native.available()`)."""

from setuptools import Extension, setup

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
)
