"""The one compiled part: merging/methods/_fused.c (optional: without a C compiler basin runs the same merges
in torch ops, only slower). Everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("merging.methods._fused", ["merging/methods/_fused.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"], optional=True)])
