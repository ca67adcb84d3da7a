"""The artifact against the model it was exported from: the reference engine (numpy, float64) must give
the training graph's logits (torch, float64) at every bit-width."""

from __future__ import annotations

import numpy as np
import torch

from kernels.reference import ReferenceEngine
from model_store import artifact
from training.model import AnyPrecisionResNet


def max_relative_difference(model: AnyPrecisionResNet, art: artifact.Artifact, images: np.ndarray) -> dict[int, float]:
    """Per bits: max |reference - torch| / max |torch| over ``images`` (uint8 [N, 28, 28])."""
    engine = ReferenceEngine(art)
    twin = AnyPrecisionResNet(model.layers_spec).double()
    twin.load_state_dict(model.state_dict())
    twin.eval()
    x = images[:, None]
    out = {}
    with torch.no_grad():
        for bits in art.bits:
            expected = twin(torch.from_numpy(x.astype(np.float64)), bits).numpy()
            got = engine.run(x, bits).astype(np.float64)
            out[bits] = float(np.abs(got - expected).max() / np.abs(expected).max())
    return out
