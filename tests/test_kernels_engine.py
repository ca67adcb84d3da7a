"""The engine against the reference engine: every backend, every bits, real test images; input checks;
the configured thread count."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kernels import clib
from kernels import engine as engine_mod
from kernels.engine import Engine
from kernels.reference import ReferenceEngine

N_IMAGES = 32  # the numpy float64 oracle is slow; the full 10,000: bench/bench_engine_agreement.py


@pytest.fixture(scope="module")
def reference(bundled, images):
    """The reference engine's logits on ``images`` per bits, each computed once."""
    engine, cache = ReferenceEngine(bundled), {}

    def logits(bits):
        if bits not in cache:
            cache[bits] = engine.run(images, bits)
        return cache[bits]

    return logits


@pytest.fixture(scope="module")
def images(test_split):
    return test_split.images[:N_IMAGES][:, None]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 32])
def test_default_backends_agree_with_reference(bundled, reference, images, bits):
    eng = Engine(bundled, threads=1)
    got, want = eng.run(images, bits), reference(bits)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("bits", [1, 32])
def test_reference_logits_do_not_depend_on_batch_mates(bundled, reference, images, bits):
    """The oracle runs a large batch in chunks; every image's logits equal its own run's, bit for bit."""
    one_by_one = np.concatenate([ReferenceEngine(bundled).run(images[i : i + 1], bits) for i in range(len(images))])
    np.testing.assert_array_equal(reference(bits), one_by_one)


@pytest.mark.parametrize(
    ("bits", "backend"),
    [
        (2, "onnxruntime-int8"),
        (4, "native"),
        (8, "native"),
        (3, "native-scalar"),
        (6, "onnxruntime-fp32-codes"),
        (8, "onnxruntime-int8"),
        (5, "int16-scalar"),
        (2, "int16"),
        (3, "int8-scalar"),
        (7, "int8"),
        (1, "int8-avx2"),
        (8, "int8"),  # VNNI where the CPU has it, else (AVX2 cannot serve 8 bits at width 8) int16
        (8, "int8-scalar"),
    ],
)
def test_non_default_backends_agree(bundled, reference, images, bits, backend):
    if backend == "onnxruntime-int8" and bits < 3:
        backend = "native"
    eng = Engine(bundled, threads=1, backends={bits: backend})
    assert (eng.run(images, bits).argmax(1) == reference(bits).argmax(1)).all()


def test_backend_names(bundled):
    eng = Engine(bundled)
    assert eng.backend(32) == "onnxruntime-fp32"
    vnni = "avx512" in clib.available_paths()  # VNNI serves every bits at width 8
    assert (
        eng.backend(8) == "int8-avx512" if vnni else eng.backend(8).startswith("int16-") and eng.backend(8) != "int16-"
    )
    assert eng.backend(4).startswith("int8-") and eng.backend(4) != "int8-"
    assert eng.backend(1).startswith("native-") and eng.backend(1) != "native-"
    popcount512 = "avx512" in engine_mod._native_paths()  # 2 bits bit-serial only with VPOPCNTDQ
    assert eng.backend(2) == "native-avx512" if popcount512 else eng.backend(2).startswith("int8-")
    assert eng.bits == bundled.bits


def test_a_profile_from_another_cpu_gets_this_cpus_defaults(bundled, monkeypatch):
    """An AVX-512 machine's profile on an AVX2-only CPU: int8 at 8 bits needs VNNI, so width 16 serves
    it; 2 bits bit-serial without VPOPCNTDQ is slower than int8 (docs/PERFORMANCE.md), so int8 serves it."""
    monkeypatch.setattr(engine_mod, "_integer_paths", lambda: ["avx2", "scalar"])
    monkeypatch.setattr(engine_mod, "_native_paths", lambda: ["avx2", "scalar"])
    foreign = {8: "int8-avx512", 4: "int8-avx512", 2: "native-avx512", 1: "native-avx512"}
    eng = Engine(bundled, backends=foreign)
    assert (eng.backend(8), eng.backend(4), eng.backend(2)) == ("int16-avx2", "int8-avx2", "int8-avx2")
    assert eng.backend(1).startswith("native-")


def test_uint8_and_float_inputs_agree(bundled, images):
    eng = Engine(bundled)
    for bits in (1, 4, 32):
        a = eng.run(images[:8], bits)
        b = eng.run(images[:8].astype(np.float32) / 255.0, bits)
        assert (a.argmax(1) == b.argmax(1)).all()


def test_bad_input_is_refused(bundled):
    eng = Engine(bundled)
    with pytest.raises(ValueError, match="not servable"):
        eng.run(np.zeros((1, 784), np.uint8), 9)
    with pytest.raises(ValueError, match="shape"):
        eng.run(np.zeros((2, 27, 28), np.uint8), 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        eng.run(np.full((1, 784), 2.0, np.float32), 8)
    with pytest.raises(ValueError, match="uint8"):
        eng.run(np.zeros((1, 784), np.int32), 8)
    with pytest.raises(ValueError, match="'gpu' cannot serve bits 4; this CPU has onnxruntime-int8"):
        Engine(bundled, backends={4: "gpu"})
    for bits, name in ((32, "native"), (2, "onnxruntime-int8"), (8, "onnxruntime-fp32"), (8, "int8-avx2")):
        with pytest.raises(ValueError, match=f"'{name}' cannot serve bits {bits}"):
            Engine(bundled, backends={bits: name})
    assert eng.run(np.zeros((0, 784), np.uint8), 2).shape == (0, 10)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_one_thread_means_no_extra_threads(bundled, images):
    """threads=1: onnxruntime sessions get no pool threads and the native kernels run on the caller."""
    eng = Engine(bundled, threads=1)
    before = _threads()
    for bits in bundled.bits:
        eng.run(images[:4], bits)
    assert _threads() == before


def test_thread_count_reaches_onnxruntime(bundled, monkeypatch):
    seen = []
    real = engine_mod._session

    def spy(model, threads):
        session = real(model, threads)
        seen.append(session.get_session_options())
        return session

    monkeypatch.setattr(engine_mod, "_session", spy)
    eng = Engine(bundled, threads=2, backends={5: "onnxruntime-int8"})
    eng.warm(32)
    eng.warm(5)
    assert [(o.intra_op_num_threads, o.inter_op_num_threads) for o in seen] == [(2, 1), (2, 1)]


def test_concurrent_callers_get_their_own_answers(bundled, images):
    from concurrent.futures import ThreadPoolExecutor

    eng = Engine(bundled, threads=1)
    jobs = [(images[i : i + 4], bits) for i, bits in zip(range(0, 32, 4), (1, 2, 8, 32, 1, 2, 8, 32), strict=True)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda j: eng.run(*j), jobs))
    for (x, bits), got in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(got, eng.run(x, bits))
