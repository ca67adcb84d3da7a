"""The Fashion-MNIST reader: real files, and clear errors for missing or damaged ones."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from model_store import fashion_mnist
from model_store.fashion_mnist import DatasetError


def test_real_test_set(test_split):
    assert test_split.images.shape == (10_000, 28, 28)
    assert test_split.images.dtype == np.uint8
    assert np.bincount(test_split.labels).tolist() == [1000] * 10


def test_validation_split_is_held_out_of_training():
    train, val = fashion_mnist.train_validation(seed=0)
    assert len(train) == 55_000 and len(val) == 5_000
    # deterministic, and no image index shared (compare raw bytes of a sample)
    train2, val2 = fashion_mnist.train_validation(seed=0)
    assert (val.images == val2.images).all()
    train_rows = {img.tobytes() for img in train.images[:20000]}
    assert sum(img.tobytes() in train_rows for img in val.images[:500]) < 5  # duplicates exist in FMNIST


@pytest.fixture()
def copy_dir(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(fashion_mnist.data_dir() / name, tmp_path / name)
    return tmp_path


def test_missing_file_names_file_and_package(tmp_path):
    with pytest.raises(DatasetError) as info:
        fashion_mnist.load("test", tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)
    assert "dataset-fashion-mnist" in str(info.value)


def test_bad_magic(copy_dir):
    path = copy_dir / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[3] = 0x03
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match="bad magic"):
        fashion_mnist.load("test", copy_dir)


def test_truncated_images(copy_dir):
    path = copy_dir / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-784]))
    with pytest.raises(DatasetError, match="bytes of pixels"):
        fashion_mnist.load("test", copy_dir)


def test_not_gzip(copy_dir):
    (copy_dir / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot decompress"):
        fashion_mnist.load("test", copy_dir)


def test_env_override(copy_dir, monkeypatch):
    monkeypatch.setenv("APSERVE_DATA_DIR", str(copy_dir))
    assert fashion_mnist.data_dir() == copy_dir
