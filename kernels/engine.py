"""The engine the server calls: ``run(batch, bits) -> logits``.

One copy of the packed weights (the loaded artifact); per-bits execution state is built lazily and
cached. Backends are picked per bits (see kernels.profiler once it lands); the reference engine is the
fallback and the oracle.
"""

from __future__ import annotations

import numpy as np

from kernels.reference import ReferenceEngine
from model_store.artifact import Artifact


class Engine:
    def __init__(self, artifact: Artifact, threads: int = 1):
        self.artifact = artifact
        self.threads = threads
        self._reference = ReferenceEngine(artifact)

    @property
    def bits(self) -> tuple[int, ...]:
        return self.artifact.bits

    def backend(self, bits: int) -> str:
        return "reference"

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        return self._reference.run(batch, bits)
