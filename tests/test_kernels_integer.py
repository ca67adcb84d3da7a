"""The native integer kernels (int16 and int8 widths): each dispatch path this CPU runs (AVX-512 VNNI, AVX2,
scalar) is bit-exact against a plain numpy integer conv, and the whole network gives the bit-serial
kernels' logits exactly (the same codes, from the same float64 requantizer), on every path."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import bitserial, integer
from kernels.reference import to_input
from model_store.artifact import pack_planes
from tests.test_kernels_native import integer_conv

PATHS = bitserial.available_paths()


def _skip_unless_served(width: int, bits: int, path: str) -> None:
    if bits > integer.max_bits(width, path):
        pytest.skip(f"width {width} on {path} serves 1..{integer.max_bits(width, path)} bits")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("cin", "cout", "size", "stride", "bits", "width"),
    [
        (32, 32, 7, 1, 8, 16),  # 7 x 8 = 56 pixels: a short last tile of the 6-pixel micro-kernel
        (32, 64, 9, 2, 3, 16),
        (2, 16, 5, 1, 5, 16),  # one channel pair
        (64, 128, 4, 1, 7, 16),
        (130, 16, 3, 2, 4, 16),
        (128, 48, 1, 1, 8, 16),  # a 1 x 2 image: every tap but the centre reads padding
        (32, 32, 7, 1, 1, 8),
        (64, 32, 6, 2, 2, 8),
        (4, 16, 5, 1, 3, 8),  # one channel quad
        (128, 16, 5, 1, 4, 8),  # 288 quads per window: widened every 72
        (132, 32, 4, 1, 5, 8),  # widened every 17 quads, mid-tap
        (64, 16, 3, 2, 6, 8),
        (128, 48, 1, 1, 7, 8),  # widened after every quad
        (64, 32, 7, 1, 8, 8),  # 8 bits, half-levels: VNNI and scalar only
        (8, 16, 3, 2, 8, 8),
    ],
)
def test_integer_conv_matches_numpy(path, cin, cout, size, stride, bits, width):
    _skip_unless_served(width, bits, path)
    rng = np.random.default_rng(cin * 1000 + cout + bits)
    codes8 = rng.integers(0, 256, size=(cout, 9 * cin), dtype=np.uint8)
    packed = integer.pack_levels(pack_planes(codes8), bits, 9 * cin, width)
    acts = rng.integers(0, 1 << bits, size=(2, size, size + 1, cin), dtype=np.uint8)
    got = integer.conv_levels(acts, packed, bits, stride, path=path)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, integer_conv(acts, codes8, bits, stride))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("bits", "width"), [(8, 16), *((k, 8) for k in range(1, 9))])
def test_extreme_codes_do_not_overflow(path, bits, width):
    """Largest activations against the most negative and most positive levels, over a whole 3x3x128
    window: the largest sums each width's partial sums can meet (int16 pair sums at width 8), exact."""
    _skip_unless_served(width, bits, path)
    cin, cout = 128, 16
    codes8 = np.full((cout, 9 * cin), 255, np.uint8)
    codes8[1::2] = 0
    acts = np.full((1, 5, 5, cin), (1 << bits) - 1, np.uint8)
    got = integer.conv_levels(acts, integer.pack_levels(pack_planes(codes8), bits, 9 * cin, width), bits, 1, path)
    want = integer_conv(acts, codes8, bits, 1)
    n = (1 << bits) - 1
    assert abs(want).max() == 9 * cin * n * n
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("bits", "width"), [(3, 16), (5, 16), (8, 16), (1, 8), (2, 8), (3, 8), (4, 8), (6, 8), (7, 8), (8, 8)]
)
def test_logits_equal_the_bit_serial_kernels(bundled, test_split, bits, width):
    x = to_input(test_split.images[:12][:, None], np.float64)[..., 0]
    want = bitserial.BitSerialNet(bundled, bits, "avx2" if "avx2" in PATHS else "scalar").run(x)
    for path in PATHS:
        if bits > integer.max_bits(width, path):
            continue
        got = integer.IntegerNet(bundled, bits, width, path).run(x, threads=1)
        np.testing.assert_array_equal(got, want, err_msg=f"int{width}-{path} differs from the bit-serial kernels")


@pytest.mark.parametrize("width", integer.WIDTHS)
def test_threads_split_the_batch_without_changing_results(bundled, test_split, width):
    x = to_input(test_split.images[:7][:, None], np.float64)[..., 0]
    net = integer.IntegerNet(bundled, 6, width)
    np.testing.assert_array_equal(net.run(x, threads=3), net.run(x, threads=1))


def test_bad_shapes_widths_and_paths_are_refused(bundled):
    planes = pack_planes(np.zeros((12, 9 * 4), np.uint8))
    with pytest.raises(ValueError, match="cout % 16"):
        integer.pack_levels(planes, 8, 9 * 4)
    with pytest.raises(ValueError, match="cin % 4"):
        integer.pack_levels(pack_planes(np.zeros((16, 9 * 6), np.uint8)), 3, 9 * 6, width=8)
    packed = integer.pack_levels(pack_planes(np.zeros((16, 9 * 4), np.uint8)), 8, 9 * 4)
    with pytest.raises(ValueError, match="needs 54"):
        integer.conv_levels(np.zeros((1, 3, 3, 6), np.uint8), packed, 8, 1)
    if "avx2" in PATHS:
        with pytest.raises(ValueError, match="avx2 serves 1..7 bits, not 8"):
            integer.IntegerNet(bundled, 8, 8, "avx2")
    with pytest.raises(ValueError, match="widths"):
        integer.IntegerNet(bundled, 4, width=4)
    with pytest.raises(ValueError, match="paths avx512, avx2, scalar"):
        integer.IntegerNet(bundled, 8, 16, "neon")
