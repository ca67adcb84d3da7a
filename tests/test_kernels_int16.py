"""The native int16 kernels: each dispatch path is bit-exact against a plain numpy integer conv, and the
whole network gives the bit-serial kernels' logits exactly (the same codes, from the same float64
requantizer), on every path."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import bitserial, int16
from kernels.reference import to_input
from model_store.artifact import pack_planes
from tests.test_kernels_native import integer_conv

PATHS = [p for p in bitserial.available_paths() if p in ("avx2", "scalar")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("cin", "cout", "size", "stride", "bits"),
    [
        (32, 32, 7, 1, 8),  # 7 x 8 = 56 pixels: a short last tile of the 6-pixel micro-kernel
        (32, 64, 9, 2, 3),
        (2, 16, 5, 1, 5),  # one channel pair
        (64, 128, 4, 1, 7),
        (130, 16, 3, 2, 4),
        (128, 48, 1, 1, 8),  # a 1 x 2 image: every tap but the centre reads padding
    ],
)
def test_integer_conv_matches_numpy(path, cin, cout, size, stride, bits):
    rng = np.random.default_rng(cin * 1000 + cout + bits)
    codes8 = rng.integers(0, 256, size=(cout, 9 * cin), dtype=np.uint8)
    packed = int16.pack_levels(pack_planes(codes8), bits, 9 * cin)
    acts = rng.integers(0, 1 << bits, size=(2, size, size + 1, cin), dtype=np.uint8)
    got = int16.conv_levels(acts, packed, stride, path=path)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, integer_conv(acts, codes8, bits, stride))


@pytest.mark.parametrize("path", PATHS)
def test_extreme_codes_do_not_overflow(path):
    """Largest activations against the most negative and most positive 8-bit levels: exact in int32,
    where int16 pair sums (vpmaddubsw) would saturate."""
    cin, cout = 128, 16
    codes8 = np.full((cout, 9 * cin), 255, np.uint8)
    codes8[1::2] = 0
    acts = np.full((1, 5, 5, cin), 255, np.uint8)
    got = int16.conv_levels(acts, int16.pack_levels(pack_planes(codes8), 8, 9 * cin), 1, path=path)
    want = integer_conv(acts, codes8, 8, 1)
    assert abs(want).max() == 9 * cin * 255 * 255
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_logits_equal_the_bit_serial_kernels(bundled, test_split, bits):
    x = to_input(test_split.images[:12][:, None], np.float64)[..., 0]
    want = bitserial.BitSerialNet(bundled, bits, "avx2" if "avx2" in PATHS else "scalar").run(x)
    for path in PATHS:
        got = int16.Int16Net(bundled, bits, path).run(x, threads=1)
        np.testing.assert_array_equal(got, want, err_msg=f"int16-{path} differs from the bit-serial kernels")


def test_threads_split_the_batch_without_changing_results(bundled, test_split):
    x = to_input(test_split.images[:7][:, None], np.float64)[..., 0]
    net = int16.Int16Net(bundled, 6)
    np.testing.assert_array_equal(net.run(x, threads=3), net.run(x, threads=1))


def test_bad_shapes_and_paths_are_refused(bundled):
    planes = pack_planes(np.zeros((12, 9 * 4), np.uint8))
    with pytest.raises(ValueError, match="cout % 16"):
        int16.pack_levels(planes, 8, 9 * 4)
    packed = int16.pack_levels(pack_planes(np.zeros((16, 9 * 4), np.uint8)), 8, 9 * 4)
    with pytest.raises(ValueError, match="needs 54"):
        int16.conv_levels(np.zeros((1, 3, 3, 6), np.uint8), packed, 1)
    with pytest.raises(ValueError, match="avx2 and scalar"):
        int16.Int16Net(bundled, 8, "avx512")
