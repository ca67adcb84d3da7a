"""The AVX-512 kernels on a machine without AVX-512: the kernel tests run again against a build of the
native library whose AVX-512 code runs on SIMDe's portable intrinsics (kernels/native/emulate_avx512.h).
So every x86 machine with AVX2 tests the AVX-512 path bit-exact against the others, not only the few
with AVX-512. The emulation checks results, not speed."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import clib

ROOT = Path(__file__).resolve().parents[1]
# On top of setup.py's own flags: AVX2 underneath, and no warning for SIMDe's 64-byte vector types
EMULATION = "-DAPQ_EMULATE_AVX512 -mavx2 -mpopcnt -Wno-psabi"
SUITES = ["tests/test_kernels_native.py", "tests/test_kernels_integer.py", "tests/test_kernels_engine.py"]

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="AVX-512 is x86"),
    pytest.mark.skipif("avx2" not in clib.available_paths(), reason="the emulation runs on AVX2"),
    pytest.mark.skipif("avx512" in clib.available_paths(), reason="this CPU runs the AVX-512 path itself"),
]


@pytest.fixture(scope="module")
def emulated_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The library built by setup.py itself (its sources and flags), with the emulation's flags added."""
    out = tmp_path_factory.mktemp("emulated")
    build = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(out / "lib"),
            "--build-temp",
            str(out / "tmp"),
        ],
        cwd=ROOT,
        env={**os.environ, "CFLAGS": f"{os.environ.get('CFLAGS', '')} {EMULATION}"},
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, (
        "building the AVX-512 emulation failed (it needs SIMDe's headers: `make system-deps` installs "
        f"libsimde-dev):\n{build.stdout[-2000:]}{build.stderr[-4000:]}"
    )
    (lib,) = (out / "lib" / "kernels").glob("_bitserial*.so")
    return lib


def _python(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_emulated_library_offers_the_avx512_path(emulated_library: Path) -> None:
    env = {**os.environ, clib.LIBRARY_ENV: str(emulated_library)}
    out = _python(env, "-c", "from kernels import clib; print(*clib.available_paths())", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["avx512", "avx2", "scalar"]


def test_the_kernel_tests_pass_on_the_emulated_avx512_path(emulated_library: Path) -> None:
    env = {**os.environ, clib.LIBRARY_ENV: str(emulated_library)}
    run = _python(env, "-m", "pytest", "-v", "-p", "no:cacheprovider", *SUITES, timeout=1200)
    failed = [line for line in run.stdout.splitlines() if "FAILED" in line or "ERROR" in line]
    assert run.returncode == 0, "\n".join(failed[:40]) + run.stdout[-3000:] + run.stderr[-2000:]
    avx512 = [line for line in run.stdout.splitlines() if "avx512" in line and "PASSED" in line]
    assert len(avx512) >= 40, f"only {len(avx512)} AVX-512 variants ran"
