"""Fashion-MNIST reader for the original IDX files (Debian's ``dataset-fashion-mnist``).

The reader checks magic numbers, dimensions and counts, so a missing or damaged file is one clear
error naming the file and the package that provides it.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
_IMAGE_MAGIC = 0x00000803
_LABEL_MAGIC = 0x00000801
VALIDATION_SIZE = 5_000


class DatasetError(RuntimeError):
    """A dataset file is missing or damaged."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N]

    def __len__(self) -> int:
        return len(self.labels)


def data_dir() -> Path:
    return Path(os.environ.get("APSERVE_DATA_DIR", DEFAULT_DATA_DIR))


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(
            f"{path}: file not found. Install the Debian package '{DEBIAN_PACKAGE}' "
            f"(apt-get install {DEBIAN_PACKAGE}) or point APSERVE_DATA_DIR at the IDX files."
        )
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot decompress ({exc}); reinstall '{DEBIAN_PACKAGE}'.") from exc


def _parse_images(path: Path, expected: int) -> np.ndarray:
    raw = _read(path)
    if len(raw) < 16:
        raise DatasetError(f"{path}: too short for an IDX image header ({len(raw)} bytes)")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != _IMAGE_MAGIC:
        raise DatasetError(f"{path}: bad magic 0x{magic:08x}, expected 0x{_IMAGE_MAGIC:08x} (IDX images)")
    if (n, rows, cols) != (expected, 28, 28):
        raise DatasetError(f"{path}: header says {n}x{rows}x{cols}, expected {expected}x28x28")
    if len(raw) != 16 + n * rows * cols:
        raise DatasetError(f"{path}: {len(raw) - 16} bytes of pixels, expected {n * rows * cols}")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def _parse_labels(path: Path, expected: int) -> np.ndarray:
    raw = _read(path)
    if len(raw) < 8:
        raise DatasetError(f"{path}: too short for an IDX label header ({len(raw)} bytes)")
    magic, n = struct.unpack(">II", raw[:8])
    if magic != _LABEL_MAGIC:
        raise DatasetError(f"{path}: bad magic 0x{magic:08x}, expected 0x{_LABEL_MAGIC:08x} (IDX labels)")
    if n != expected or len(raw) != 8 + n:
        raise DatasetError(f"{path}: {len(raw) - 8} labels (header {n}), expected {expected}")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if labels.max() >= len(LABELS):
        raise DatasetError(f"{path}: label {labels.max()} out of range 0..{len(LABELS) - 1}")
    return labels


def load(split: str, directory: Path | None = None) -> Split:
    """Load ``"train"`` (60,000) or ``"test"`` (10,000) images and labels."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    root = directory or data_dir()
    images_name, labels_name, n = _FILES[split]
    return Split(_parse_images(root / images_name, n), _parse_labels(root / labels_name, n))


def train_validation(seed: int = 0, directory: Path | None = None) -> tuple[Split, Split]:
    """The 60,000 training images split into 55,000 for training and 5,000 held out for
    validation (model selection, calibration). The test set is never used for either."""
    full = load("train", directory)
    order = np.random.default_rng(seed).permutation(len(full))
    val, train = order[:VALIDATION_SIZE], order[VALIDATION_SIZE:]
    return (
        Split(full.images[train], full.labels[train]),
        Split(full.images[val], full.labels[val]),
    )
