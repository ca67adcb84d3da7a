"""Training side: recipes, the quantizers' nesting, export fidelity, and the reference engine reproducing
the training graph on real test images at every bit-width."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from model_store import artifact
from training import quant
from training.check import max_relative_difference
from training.export import export, tensors_of
from training.model import AnyPrecisionResNet, macs_per_image
from training.train import Recipe, lr_at, step_bits, train


@pytest.fixture(scope="module")
def model(test_split) -> AnyPrecisionResNet:
    """A model with random weights whose BatchNorm statistics come from real images, so activations are
    spread over every quantization level as in a trained model."""
    torch.manual_seed(0)
    m = AnyPrecisionResNet()
    m.train()
    x = torch.from_numpy(test_split.images[-200:, None].astype(np.float32))
    with torch.no_grad():
        for bits in artifact.BITS:
            m(x, bits)
    return m.eval()


def test_floor_grid_nests_for_any_weights():
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1)
    codes8 = quant.weight_codes8(w)
    assert codes8.min() >= 0 and codes8.max() <= 255
    span = w.abs().flatten(1).amax(1)
    u = (w.flatten(1) / span[:, None] + 1) / 2
    for bits in range(1, 9):
        direct = torch.clamp(torch.floor(u * (1 << bits)), 0, (1 << bits) - 1)
        assert torch.equal(direct.view_as(w), torch.floor(codes8 / (1 << (8 - bits))))


def test_one_bit_weights_are_sign_times_mean_abs():
    w = torch.randn(4, 3, 3, 3)
    wq = quant.quantize_weight(w, 1)
    expected = torch.sign(w) * w.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(wq, expected, atol=1e-6)


def test_activation_quantizer_grid():
    a = torch.tensor([-1.0, 0.0, 0.16, 0.17, 0.5, 0.99, 2.0])
    assert quant.quantize_activation(a, 1).tolist() == [0, 0, 0, 0, 1, 1, 1]
    q2 = quant.quantize_activation(a, 2) * 3
    assert q2.tolist() == pytest.approx([0, 0, 0, 1, 2, 3, 3])
    assert quant.quantize_activation(a, 32).tolist() == pytest.approx([0, 0, 0.16, 0.17, 0.5, 0.99, 2.0])


def test_exported_codes_are_the_training_codes(model):
    """The k-bit weights the training graph uses equal the ones decoded from the first k planes."""
    tensors = tensors_of(model)
    block = model.blocks[2]
    planes = tensors["s2b1.conv1.planes"]
    w = block.conv1.weight
    k = w[0].numel()
    codes8 = quant.weight_codes8(w)
    for bits in range(1, 9):
        lv = quant.levels(codes8, bits)
        trained = (lv * quant.lsq_scale(w, lv).view(-1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        codes = artifact.unpack_codes(planes, bits, k).astype(np.float32)
        n = 1 << bits
        scale = tensors["s2b1.conv1.scales"][bits - 1][:, None]
        assert np.array_equal((2 * codes + 1 - n) / n * scale, trained.numpy())
        # the straight-through forward adds w + (wq - w): equal up to float32 rounding
        ste = quant.quantize_weight(w, bits).detach().permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        assert np.allclose(ste.numpy(), trained.numpy(), rtol=1e-6, atol=1e-9)


def test_reference_engine_reproduces_training_graph(model, tmp_path, test_split):
    path = export(model, tmp_path / "m.apm")
    diff = max_relative_difference(model, artifact.load(path), test_split.images[:64])
    assert set(diff) == set(artifact.BITS)
    assert max(diff.values()) <= 1e-3, diff


def test_bundled_artifact_was_checked_at_export(bundled):
    recorded = bundled.manifest["training"].get("reference_max_relative_difference")
    if recorded is None:
        pytest.skip("bundled artifact predates the export check")
    assert max(recorded.values()) <= 1e-3


def test_model_size():
    assert macs_per_image() >= 80_000_000


def test_recipes_load_and_validate(tmp_path):
    default = Recipe.load("default")
    assert default.trained_bits[0] == 32 and 1 in default.trained_bits
    dedicated = Recipe.load("dedicated-2")
    assert dedicated.trained_bits == [2] and dedicated.epochs == default.epochs
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        Recipe.load(bad)
    bad.write_text("always_bits: [9]\n")
    with pytest.raises(ValueError, match="bits 9"):
        Recipe.load(bad)


def test_fine_tuning_starts_from_the_parent_run(model, tmp_path):
    """`init` starts a run from a finished run's weights, and the parent's summary travels along."""
    parent = tmp_path / "parent.pt"
    torch.save({"model": model.state_dict(), "summary": {"recipe": {"name": "parent"}}}, parent)
    assert Recipe.load("continue").init == "runs/default/final.pt"
    recipe = Recipe(epochs=0, calibration_batches=1, always_bits=[32], init=str(parent), threads=1)
    tuned, summary = train(recipe, tmp_path / "run")
    assert summary["initialised_from"] == {"path": str(parent), "summary": {"recipe": {"name": "parent"}}}
    for name, value in model.state_dict().items():
        if name.endswith(".weight") and ".bns." not in name:  # BN is re-calibrated, weights are as given
            assert torch.equal(tuned.state_dict()[name], value), name


def test_step_bits_highest_first_and_deterministic():
    recipe = Recipe.load("default")
    a = [step_bits(recipe, random.Random(3)) for _ in range(5)]
    b = [step_bits(recipe, random.Random(3)) for _ in range(5)]
    assert a == b
    for bits in a:
        assert bits == sorted(bits, reverse=True) and bits[0] == 32 and bits[-1] == 1 and len(bits) == 3


def test_lr_schedule_warms_up_and_decays():
    recipe = Recipe.load("default")
    total = 1000
    peak = max(lr_at(recipe, s, total) for s in range(total))
    assert peak == pytest.approx(recipe.lr)
    assert lr_at(recipe, 0, total) < peak and lr_at(recipe, total - 1, total) < 0.01 * peak
