"""Shared fixtures. Tests that need the Fashion-MNIST files find them where Debian's package puts them
(make test installs it); a missing dataset is an error, not a skip."""

from __future__ import annotations

import os

import pytest

from model_store import artifact, fashion_mnist


@pytest.fixture(scope="session")
def bundled() -> artifact.Artifact:
    return artifact.load(artifact.BUNDLED)


@pytest.fixture(scope="session")
def test_split() -> fashion_mnist.Split:
    return fashion_mnist.load("test")


@pytest.fixture(scope="session", autouse=True)
def profile_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Servers the tests start keep their quick profile of this machine (made at the first start when the
    bundled profile is another machine's) in the session's own cache, not the user's."""
    os.environ["APSERVE_PROFILE_CACHE_DIR"] = str(tmp_path_factory.mktemp("profile-cache"))
