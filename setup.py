"""Build hook for the optional CPU kernels `gcnet._C` (metadata lives in pyproject.toml).

They need torch at build time: `pip install --no-build-isolation .` after torch (the Makefile does
this). Without torch, off Linux, with GCNET_NATIVE=0, or when the compiler fails, gcnet installs
without them and the blocks run their PyTorch paths, which compute the same numbers.
GCNET_KERNEL_ISA=avx2 builds them for AVX2 only (no AVX-512 clones): with PyTorch held to AVX2 too
(ATEN_CPU_CAPABILITY=avx2), an AVX-512 machine then runs the code an AVX2 machine would.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup


def native_extension() -> dict:
    if os.environ.get("GCNET_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("gcnet: torch is not importable at build time; installing without the CPU kernels", file=sys.stderr)
        return {}

    class OptionalBuild(BuildExtension):
        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 - the kernels are an optimisation: never fail the install
                print(f"gcnet: building the CPU kernels failed ({error}); installing without them", file=sys.stderr)
                self.extensions = []  # nothing for the install steps to copy

    isa = os.environ.get("GCNET_KERNEL_ISA", "")
    if isa not in ("", "avx2"):
        raise SystemExit(f"GCNET_KERNEL_ISA: expected 'avx2' or unset (every ISA), got {isa!r}")
    kernels = CppExtension(
        "gcnet._C",
        ["src/gcnet/csrc/attention_pool.cpp"],
        extra_compile_args=["-O3", "-fopenmp"] + (["-DGCNET_AVX2_ONLY"] if isa else []),
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [kernels], "cmdclass": {"build_ext": OptionalBuild}}


setup(**native_extension())
