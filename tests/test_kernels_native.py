"""The native bit-serial kernels: every dispatch path this CPU runs is bit-exact against a plain numpy
integer conv and against the portable C path, on random layers with odd shapes and both strides."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kernels import bitserial
from kernels.reference import im2col, to_input
from model_store.artifact import pack_planes

PATHS = bitserial.available_paths()


def integer_conv(codes: np.ndarray, codes8: np.ndarray, bits: int, stride: int) -> np.ndarray:
    """sum_j (2 c_j + 1 - 2^k) a_j in int64, with c the top-k bits of the 8-bit weight codes."""
    c = (codes8 >> (8 - bits)).astype(np.int64)
    levels = 2 * c + 1 - (1 << bits)  # [cout, K]
    cols = im2col(codes.astype(np.int64), 3, stride)  # [B, Ho, Wo, K], zero padding
    return cols @ levels.T


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("cin", "cout", "size", "stride", "bits"),
    [
        (32, 32, 7, 1, 1),
        (32, 64, 9, 2, 2),
        (3, 5, 5, 1, 1),  # a row shorter than one word
        (70, 9, 6, 2, 2),  # channels straddle a word, odd cout (SIMD tails)
        (64, 128, 4, 1, 1),
        (130, 7, 3, 1, 3),  # three words per pixel, three planes
        (17, 33, 8, 2, 8),  # all eight planes
        (128, 6, 5, 1, 5),
        (32, 32, 20, 1, 1),  # wide enough for dense tiles (consecutive origins, border lanes dropped)
        (20, 12, 18, 1, 3),
        (16, 24, 20, 1, 2),  # four taps share a word (AVX-512: assembled in a register)
        (8, 16, 9, 2, 1),  # eight taps share a word
    ],
)
def test_integer_conv_matches_numpy(path, cin, cout, size, stride, bits):
    rng = np.random.default_rng(cin * 1000 + cout + bits)
    codes8 = rng.integers(0, 256, size=(cout, 9 * cin), dtype=np.uint8)
    planes = pack_planes(codes8)
    acts = rng.integers(0, 1 << bits, size=(2, size, size + 1, cin), dtype=np.uint8)
    got = bitserial.conv_codes(acts, planes, bits, stride, path=path)
    np.testing.assert_array_equal(got, integer_conv(acts, codes8, bits, stride))


@pytest.mark.parametrize("path", PATHS)
def test_extreme_codes_do_not_overflow(path):
    """All-ones activations and weights at 8 bits: the largest sums the accumulators must hold."""
    cin, cout = 128, 4
    codes8 = np.full((cout, 9 * cin), 255, np.uint8)
    codes8[1] = 0
    acts = np.full((1, 5, 5, cin), 255, np.uint8)
    got = bitserial.conv_codes(acts, pack_planes(codes8), 8, 1, path=path)
    np.testing.assert_array_equal(got, integer_conv(acts, codes8, 8, 1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("height", "width", "kernel", "cout"),
    [
        (28, 28, 5, 32),  # the bundled model's stem
        (9, 7, 3, 16),  # odd width: a last pixel without a pair
        (6, 9, 4, 16),  # even kernel: one more pixel of padding before than after
        (5, 6, 7, 48),  # a window wider than the image
        (4, 4, 9, 16),  # more taps than the SIMD stems' masks hold: the scalar stem
        (7, 5, 5, 8),  # channels that do not fill a vector: the scalar stem
    ],
)
def test_stem_sums_its_taps_in_order(path, height, width, kernel, cout):
    """Every path's stem is bit-equal to the taps summed in (ky, kx) order in float64 over the zero-padded
    image, on images with black regions and signed zeros: the SIMD stems skip the taps whose pixels are all
    zero, which must not change a bit."""
    rng = np.random.default_rng(height * 100 + width * 10 + kernel)
    image = rng.normal(size=(height, width))
    image[rng.random((height, width)) < 0.4] = 0.0
    image[: height // 2, : width // 2] = -0.0
    weights = rng.normal(size=(kernel * kernel, cout))
    pad = kernel // 2
    padded = np.zeros((height + kernel - 1, width + kernel - 1))
    padded[pad : pad + height, pad : pad + width] = image
    expected = np.zeros((height, width, cout))
    for k in range(kernel * kernel):
        ky, kx = divmod(k, kernel)
        expected += padded[ky : ky + height, kx : kx + width, None] * weights[k]
    got = bitserial.stem(image, weights, path=path)
    np.testing.assert_array_equal(got, expected)
    assert not np.signbit(got[got == 0]).any()  # a sum that starts at +0 never becomes -0


# SIMD epilogues specialised for 1..3 bits, generic at 4, scalar packing at 8 (few images: 64 plane pairs)
@pytest.mark.parametrize(("bits", "images"), [(1, 24), (2, 24), (3, 24), (4, 8), (8, 2)])
def test_every_path_gives_identical_logits(bundled, test_split, bits, images):
    x = to_input(test_split.images[:images][:, None], np.float64)[..., 0]
    outs = {p: bitserial.BitSerialNet(bundled, bits, p).run(x, threads=1) for p in PATHS}
    for path in PATHS:
        np.testing.assert_array_equal(outs[path], outs["scalar"], err_msg=f"{path} differs from scalar")


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_negative_batchnorm_scales_give_identical_logits(bundled, test_split, bits):
    """Channels whose BN scale is negative count thresholds from above (the SIMD epilogues fold that sign
    into their thresholds); the bundled model has none, so negate every third channel's gamma."""
    tensors = dict(bundled.tensors)
    for name, t in bundled.tensors.items():
        if name.endswith((".bn1.gamma", ".bn2.gamma")):
            tensors[name] = t.copy()
            tensors[name][:, ::3] *= -1
    flipped = dataclasses.replace(bundled, tensors=tensors)
    x = to_input(test_split.images[:16][:, None], np.float64)[..., 0]
    outs = {p: bitserial.BitSerialNet(flipped, bits, p).run(x, threads=1) for p in PATHS}
    for path in PATHS:
        np.testing.assert_array_equal(outs[path], outs["scalar"], err_msg=f"{path} differs from scalar")


def test_threads_split_the_batch_without_changing_results(bundled, test_split):
    x = to_input(test_split.images[:7][:, None], np.float64)[..., 0]
    net = bitserial.BitSerialNet(bundled, 1)
    np.testing.assert_array_equal(net.run(x, threads=3), net.run(x, threads=1))


def test_weights_are_read_in_place(bundled):
    """One copy of the packed weights: the native net points into the artifact's own buffer."""
    net = bitserial.BitSerialNet(bundled, 2)
    planes = bundled.tensors["s1b1.conv1.planes"]
    assert any(np.shares_memory(a, planes) for a in net._keep)


def test_unsupported_path_is_refused_clearly():
    with pytest.raises(ValueError, match="unknown kernel path"):
        bitserial.conv_codes(
            np.zeros((1, 3, 3, 1), np.uint8), pack_planes(np.zeros((1, 9), np.uint8)), 1, 1, path="neon"
        )
    if "avx512" not in PATHS:
        with pytest.raises(bitserial.NativeError, match="not supported by this CPU"):
            bitserial.conv_codes(
                np.zeros((1, 3, 3, 1), np.uint8), pack_planes(np.zeros((1, 9), np.uint8)), 1, 1, path="avx512"
            )
