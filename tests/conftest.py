"""Shared fixtures. Tests that need the Fashion-MNIST files find them where Debian's package puts them
(make test installs it); a missing dataset is an error, not a skip."""

from __future__ import annotations

import pytest

from model_store import artifact, fashion_mnist


@pytest.fixture(scope="session")
def bundled() -> artifact.Artifact:
    return artifact.load(artifact.BUNDLED)


@pytest.fixture(scope="session")
def test_split() -> fashion_mnist.Split:
    return fashion_mnist.load("test")
