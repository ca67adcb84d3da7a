"""Build hook for the native kernels (kernels/native). Metadata lives in pyproject.toml.

The native kernels (bit-serial for 1..8 bits, int16 for 3..8) are plain C with no Python C API: setuptools compiles them into a shared library
that kernels/clib.py loads with ctypes (which releases the GIL around every call). Only a C compiler
is needed: no torch, no network. SIMD paths are chosen at run time, so no -march flag is used here.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildNative(build_ext):
    """Fail the install with a clear message when the kernels cannot be compiled."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            raise SystemExit(
                f"apserve: building the native kernels ({', '.join(ext.sources)}) failed: {exc}\n"
                "apserve needs a C compiler (gcc or clang) at install time, e.g. `apt-get install gcc`."
            ) from exc

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a ctypes library, not a Python module: no PyInit_ symbol to export


setup(
    ext_modules=[
        Extension(
            "kernels._bitserial",
            sources=["kernels/native/bitserial.c", "kernels/native/integer.c"],
            depends=["kernels/native/common.h", "kernels/native/avx2.h", "kernels/native/avx512.h"],
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-strict-aliasing"],
            libraries=["m", "pthread"],
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
