"""The packed any-precision artifact: one file, all bit-widths.

Layout (little-endian)::

    magic    8 bytes   b"\\x89APSRV\\r\\n"  (the \\r\\n catches text-mode mangling, like PNG's)
    version  u32       FORMAT_VERSION
    length   u32       bytes of the manifest
    manifest           UTF-8 JSON: architecture, tensor table, accuracy, recipe, payload sha256, ...
    padding            zeros up to a 64-byte boundary
    payload            the tensors, each 64-byte aligned, at the offsets the manifest gives

A quantized conv stores its 8-bit weight codes as 8 bit-planes, plane-major and MSB first: plane p holds
bit (7 - p) of every code, so the k-bit codes (code_8 >> (8 - k)) are exactly planes 0..k-1 and loading
k bits reads only the first k planes. Each plane is [cout, row_bytes]: the row of output channel o holds
its K = kh*kw*cin weights in (kh, kw, cin) order, bit j of the row at byte j // 8, bit j % 8, rows padded
with zeros to whole 64-bit words (so a row reads as little-endian uint64 words).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"\x89APSRV\r\n"
FORMAT_VERSION = 1
ALIGN = 64
BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)  # row i of every per-bit-width table is BITS[i]
WEIGHT_BITS = 8
DTYPES = {"uint8": np.uint8, "float32": np.float32}
BN_PARAMS = ("gamma", "beta", "mean", "var")
BUNDLED = Path(__file__).with_name("fashion-resnet.apm")


class ArtifactError(ValueError):
    """The file is not a valid artifact; the message names the file and the problem."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def architecture(self) -> list[dict[str, Any]]:
        return list(self.manifest["architecture"])

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.manifest["bits"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    def accuracy(self, split: str = "test") -> dict[int, float]:
        table = self.manifest.get("accuracy", {}).get(split, {})
        return {int(k): float(v) for k, v in table.items()}

    @property
    def bn_eps(self) -> float:
        return float(self.manifest.get("bn_eps", 1e-5))

    def bn_params(self, name: str, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """BatchNorm (gamma, beta, mean, var) of ``name`` (e.g. "s1b1.bn1") at ``bits``, as trained."""
        row = BITS.index(bits)
        gamma, beta, mean, var = (self.tensors[f"{name}.{p}"][row] for p in BN_PARAMS)
        return gamma, beta, mean, var

    def bn(self, name: str, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """BatchNorm of ``name`` at ``bits`` folded to float32 (scale, shift): y = x * scale + shift."""
        gamma, beta, mean, var = (p.astype(np.float64) for p in self.bn_params(name, bits))
        scale = gamma / np.sqrt(var + self.bn_eps)
        return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def row_bytes(k: int) -> int:
    return (k + 63) // 64 * 8


def pack_planes(codes8: np.ndarray) -> np.ndarray:
    """uint8 codes [cout, K] -> bit-planes uint8 [8, cout, row_bytes(K)], MSB plane first."""
    cout, k = codes8.shape
    padded = np.zeros((cout, row_bytes(k) * 8), dtype=np.uint8)
    padded[:, :k] = codes8
    bits = (padded[None, :, :] >> np.arange(7, -1, -1, dtype=np.uint8)[:, None, None]) & 1
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_codes(planes: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The k-bit codes [cout, K] (uint8) from the first ``bits`` planes."""
    top = np.unpackbits(planes[:bits], axis=-1, bitorder="little")[:, :, :k]
    codes = np.zeros(top.shape[1:], dtype=np.uint8)
    for p in range(bits):
        codes = (codes << 1) | top[p]
    return codes


def conv_k(layer: dict[str, Any], conv: str) -> tuple[int, int]:
    """(cin, cout) of ``conv`` ('conv1' or 'conv2') in a preact block."""
    if conv == "conv1":
        return layer["in"], layer["out"]
    return layer["out"], layer["out"]


def expected_tensors(architecture: list[dict[str, Any]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor the architecture needs, with its dtype and shape."""
    nb = len(BITS)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for layer in architecture:
        name, kind = layer["name"], layer["type"]
        if kind == "stem":
            kk = layer["kernel"]
            out[f"{name}.weight"] = ("float32", (layer["out"], layer["in"], kk, kk))
        elif kind == "preact_block":
            kk = layer["kernel"]
            for p in BN_PARAMS:
                out[f"{name}.bn1.{p}"] = ("float32", (nb, layer["in"]))
                out[f"{name}.bn2.{p}"] = ("float32", (nb, layer["out"]))
            for conv in ("conv1", "conv2"):
                cin, cout = conv_k(layer, conv)
                out[f"{name}.{conv}.planes"] = ("uint8", (WEIGHT_BITS, cout, row_bytes(kk * kk * cin)))
                out[f"{name}.{conv}.scales"] = ("float32", (WEIGHT_BITS, cout))
        elif kind == "head":
            for p in BN_PARAMS:
                out[f"{name}.bn.{p}"] = ("float32", (nb, layer["in"]))
            out[f"{name}.fc.weight"] = ("float32", (layer["out"], layer["in"]))
            out[f"{name}.fc.bias"] = ("float32", (layer["out"],))
        else:
            raise ArtifactError(f"unknown layer type {kind!r} in layer {name!r}")
    return out


def _check_architecture(architecture: Any) -> None:
    if not isinstance(architecture, list) or len(architecture) < 2:
        raise ArtifactError("architecture must be a list of at least a stem and a head")
    if architecture[0].get("type") != "stem" or architecture[-1].get("type") != "head":
        raise ArtifactError("architecture must start with a stem and end with a head")
    width = architecture[0]["out"]
    for layer in architecture[1:]:
        if layer.get("in") != width:
            raise ArtifactError(f"layer {layer.get('name')!r} takes {layer.get('in')} channels, previous gives {width}")
        if layer["type"] == "preact_block" and (layer.get("stride") not in (1, 2) or layer.get("kernel") != 3):
            raise ArtifactError(f"layer {layer['name']!r}: only 3x3 convs with stride 1 or 2 are supported")
        width = layer["out"]


def save(path: str | Path, manifest: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    """Write an artifact; the tensor table, payload size and sha256 are filled in here."""
    path = Path(path)
    expected = expected_tensors(manifest["architecture"])
    if set(expected) != set(tensors):
        raise ArtifactError(f"tensors do not match the architecture: {sorted(set(expected) ^ set(tensors))}")
    table, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, shape = expected[name]
        arr = np.ascontiguousarray(tensors[name], dtype=DTYPES[dtype])
        if arr.shape != shape:
            raise ArtifactError(f"tensor {name}: shape {arr.shape}, architecture needs {shape}")
        pad = -offset % ALIGN
        chunks.append(b"\0" * pad)
        offset += pad
        table[name] = {"dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": arr.nbytes}
        chunks.append(arr.tobytes())
        offset += arr.nbytes
    payload = b"".join(chunks)
    manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "tensors": table,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(manifest, indent=1, sort_keys=True).encode()
    prefix = MAGIC + struct.pack("<II", FORMAT_VERSION, len(head)) + head
    prefix += b"\0" * (-len(prefix) % ALIGN)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(prefix + payload)
    tmp.replace(path)
    return path


def load(path: str | Path = BUNDLED) -> Artifact:
    """Read and verify an artifact: magic, version, checksum, the tensor table and every shape."""
    path = Path(path)

    def fail(problem: str) -> ArtifactError:
        return ArtifactError(f"{path}: {problem}")

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read ({exc.strerror or exc})") from None
    if len(raw) < 16:
        raise fail(f"truncated: {len(raw)} bytes, not even a header")
    if raw[:8] != MAGIC:
        raise fail("not an apserve artifact (bad magic bytes)")
    version, length = struct.unpack("<II", raw[8:16])
    if version != FORMAT_VERSION:
        raise fail(f"format version {version}, this apserve reads version {FORMAT_VERSION}")
    if 16 + length > len(raw):
        raise fail(f"truncated: the manifest needs {length} bytes, the file has {len(raw) - 16}")
    try:
        manifest = json.loads(raw[16 : 16 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise fail("manifest is not a JSON object")
    for key in ("name", "architecture", "tensors", "payload_bytes", "payload_sha256", "bits", "labels"):
        if key not in manifest:
            raise fail(f"manifest lacks '{key}'")
    if manifest.get("format_version") != version:
        raise fail(f"manifest says format version {manifest.get('format_version')}, header says {version}")
    start = 16 + length + (-(16 + length) % ALIGN)
    payload = raw[start:]
    if len(payload) != manifest["payload_bytes"]:
        raise fail(f"truncated or padded: payload is {len(payload)} bytes, manifest says {manifest['payload_bytes']}")
    if hashlib.sha256(payload).hexdigest() != manifest["payload_sha256"]:
        raise fail("checksum mismatch: the payload is corrupted (sha256 differs from the manifest)")
    try:
        _check_architecture(manifest["architecture"])
        expected = expected_tensors(manifest["architecture"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise fail(f"architecture is malformed ({exc!r})") from None
    except ArtifactError as exc:
        raise fail(str(exc)) from None
    table = manifest["tensors"]
    if set(table) != set(expected):
        missing, extra = sorted(set(expected) - set(table)), sorted(set(table) - set(expected))
        raise fail(f"tensor table does not match the architecture (missing {missing}, unexpected {extra})")
    tensors: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in expected.items():
        entry = table[name]
        if entry.get("dtype") != dtype or tuple(entry.get("shape", ())) != shape:
            raise fail(
                f"tensor {name} is {entry.get('dtype')}{entry.get('shape')}, the architecture needs {dtype}{list(shape)}"
            )
        nbytes = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
        offset = entry.get("offset", -1)
        if entry.get("nbytes") != nbytes or not 0 <= offset <= len(payload) - nbytes:
            raise fail(f"tensor {name} lies outside the payload or has the wrong size")
        arr = np.frombuffer(payload, dtype=DTYPES[dtype], count=int(np.prod(shape)), offset=offset).reshape(shape)
        if dtype == "float32" and not np.isfinite(arr).all():
            raise fail(f"tensor {name} holds NaN or infinity")
        if name.endswith(".var") and (arr < 0).any():
            raise fail(f"tensor {name} holds a negative variance")
        tensors[name] = arr
    if sorted(manifest["bits"]) != sorted(BITS):
        raise fail(f"servable bits {manifest['bits']}, this format serves {list(BITS)}")
    n_out = manifest["architecture"][-1]["out"]
    if len(manifest["labels"]) != n_out:
        raise fail(f"{len(manifest['labels'])} labels for {n_out} outputs")
    return Artifact(path, manifest, tensors)
