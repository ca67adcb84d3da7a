"""The artifact format: nesting of the stored codes, size, and refusal of every kind of damaged file."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model_store import artifact
from model_store.artifact import ArtifactError


def conv_names(art: artifact.Artifact) -> list[str]:
    return sorted(n[: -len(".planes")] for n in art.tensors if n.endswith(".planes"))


def k_of(art: artifact.Artifact, conv: str) -> int:
    block = next(layer for layer in art.architecture if conv.startswith(layer["name"] + "."))
    cin = block["in"] if conv.endswith("conv1") else block["out"]
    return 9 * cin


def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(7, 100), dtype=np.uint8)
    planes = artifact.pack_planes(codes)
    assert planes.shape == (8, 7, 16)  # 100 bits -> two 64-bit words
    assert (artifact.unpack_codes(planes, 8, 100) == codes).all()
    # plane 0 is the most significant bit
    assert (np.unpackbits(planes[0], axis=-1, bitorder="little")[:, :100] == codes >> 7).all()


def test_trained_codes_nest_exactly(bundled):
    """For every weight of the bundled model, the k-bit floor-grid code of any value in its 8-bit bin is
    exactly the top k stored bits: code_k == code_8 >> (8 - k), for k = 1..8."""
    rng = np.random.default_rng(0)
    for conv in conv_names(bundled):
        k = k_of(bundled, conv)
        planes = bundled.tensors[f"{conv}.planes"]
        code8 = artifact.unpack_codes(planes, 8, k).astype(np.int64)
        u = (code8 + rng.uniform(0, 1, code8.shape)) / 256.0  # a value inside the weight's 8-bit bin
        for bits in range(1, 9):
            direct = np.clip(np.floor(u * (1 << bits)), 0, (1 << bits) - 1).astype(np.int64)
            top = artifact.unpack_codes(planes, bits, k).astype(np.int64)
            assert (top == code8 >> (8 - bits)).all(), conv
            assert (direct == top).all(), (conv, bits)


def test_rounding_grid_would_not_nest(bundled):
    """The seeds' DoReFa rounding grid, applied to the same weights, disagrees with the top bits of its own
    8-bit code for a sizeable fraction of weights at k = 2..7: why we train on the floor grid."""
    conv = conv_names(bundled)[0]
    code8 = artifact.unpack_codes(bundled.tensors[f"{conv}.planes"], 8, k_of(bundled, conv)).astype(np.int64)
    u = (code8 + 0.5) / 256.0
    r8 = np.round(u * 255).astype(np.int64)
    mismatch = []
    for bits in range(2, 8):
        rk = np.round(u * ((1 << bits) - 1)).astype(np.int64)
        mismatch.append(float((rk != r8 >> (8 - bits)).mean()))
    assert min(mismatch) > 0.01


def test_size_bound(bundled):
    """At most 1.1 x (1 byte per quantized weight + 4 bytes per other parameter)."""
    quantized = sum(k_of(bundled, c) * bundled.tensors[f"{c}.planes"].shape[1] for c in conv_names(bundled))
    other = sum(a.size for n, a in bundled.tensors.items() if not n.endswith(".planes"))
    assert bundled.path.stat().st_size <= 1.1 * (quantized + 4 * other)


def test_manifest(bundled):
    m = bundled.manifest
    assert m["name"] == "fashion-resnet"
    assert bundled.bits == (1, 2, 3, 4, 5, 6, 7, 8, 32)
    assert len(bundled.labels) == 10
    assert m["macs_per_image"] >= 80_000_000
    for key in ("architecture", "input", "output", "accuracy", "training", "payload_sha256", "format_version"):
        assert key in m


# --- damaged files: each refused with one clear error naming the file and the problem ---


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Re-save ``src`` with ``edit(manifest, tensors)`` applied (checksum recomputed)."""
    art = artifact.load(src)
    manifest = {k: v for k, v in art.manifest.items() if k not in ("tensors", "payload_bytes", "payload_sha256")}
    tensors = {k: np.array(v) for k, v in art.tensors.items()}
    edit(manifest, tensors)
    return artifact.save(dst, manifest, tensors)


def write_raw(src: Path, dst: Path, mutate) -> Path:
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(mutate(data)))
    return dst


def expect_refused(path: Path, *words: str) -> None:
    with pytest.raises(ArtifactError) as info:
        artifact.load(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_refuses_missing_file(tmp_path):
    expect_refused(tmp_path / "nope.apm", "cannot read")


def test_refuses_truncated_payload(tmp_path):
    path = write_raw(artifact.BUNDLED, tmp_path / "t.apm", lambda d: d[: len(d) - 1000])
    expect_refused(path, "truncated")


def test_refuses_truncated_header(tmp_path):
    path = write_raw(artifact.BUNDLED, tmp_path / "t.apm", lambda d: d[:100])
    expect_refused(path, "truncated")


def test_refuses_empty_file(tmp_path):
    path = write_raw(artifact.BUNDLED, tmp_path / "t.apm", lambda d: b"")
    expect_refused(path, "truncated")


def test_refuses_bad_magic(tmp_path):
    path = write_raw(artifact.BUNDLED, tmp_path / "t.apm", lambda d: b"PK\x03\x04" + d[4:])
    expect_refused(path, "magic")


def test_refuses_wrong_version(tmp_path):
    path = write_raw(artifact.BUNDLED, tmp_path / "t.apm", lambda d: d[:8] + struct.pack("<I", 99) + d[12:])
    expect_refused(path, "version 99")


def test_refuses_corrupted_payload(tmp_path):
    def flip(d: bytearray) -> bytearray:
        d[-5000] ^= 0x40
        return d

    expect_refused(write_raw(artifact.BUNDLED, tmp_path / "t.apm", flip), "checksum")


def test_refuses_corrupted_manifest(tmp_path):
    def garble(d: bytearray) -> bytearray:
        d[20] = ord("\x01")
        return d

    expect_refused(write_raw(artifact.BUNDLED, tmp_path / "t.apm", garble), "manifest")


def test_refuses_inconsistent_shape(tmp_path):
    def edit(manifest, tensors):
        pass

    path = rewrite(artifact.BUNDLED, tmp_path / "t.apm", edit)
    # a manifest whose tensor table lies about a shape, with a valid checksum
    raw = path.read_bytes()
    length = struct.unpack("<I", raw[12:16])[0]
    manifest = json.loads(raw[16 : 16 + length])
    manifest["tensors"]["head.fc.bias"]["shape"] = [11]
    head = json.dumps(manifest).encode()
    prefix = raw[:8] + struct.pack("<II", 1, len(head)) + head
    prefix += b"\0" * (-len(prefix) % artifact.ALIGN)
    start = 16 + length + (-(16 + length) % artifact.ALIGN)
    path.write_bytes(prefix + raw[start:])
    expect_refused(path, "head.fc.bias")


def test_refuses_inconsistent_architecture(tmp_path):
    def edit(manifest, tensors):
        manifest["architecture"][2]["in"] = 48

    with pytest.raises(ArtifactError):  # save itself refuses tensors that do not fit
        rewrite(artifact.BUNDLED, tmp_path / "t.apm", edit)


def test_refuses_nan(tmp_path):
    def edit(manifest, tensors):
        tensors["head.fc.bias"][3] = np.nan

    expect_refused(rewrite(artifact.BUNDLED, tmp_path / "t.apm", edit), "NaN")


def test_refuses_wrong_label_count(tmp_path):
    def edit(manifest, tensors):
        manifest["labels"] = manifest["labels"][:9]

    expect_refused(rewrite(artifact.BUNDLED, tmp_path / "t.apm", edit), "labels")


def test_cli_reports_damage_without_traceback(tmp_path):
    path = write_raw(artifact.BUNDLED, tmp_path / "t.apm", lambda d: d[: len(d) // 2])
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "eval", "--model", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and "truncated" in proc.stderr
