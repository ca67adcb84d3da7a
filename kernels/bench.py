"""`apserve bench`: the engine's real code path at bits {32, 8, 4, 2, 1} x batch {1, 32}, and two peers:
"torch-fp32-eager" (the same network as a plain torch module in eval mode, what a user would write; torch
is imported here only, never by serving code) and "onnxruntime-fp32" (the fp32 graph in a bare session).
Output per ARCHITECTURE.md: {"rows": [{bits, batch, backend, ms_median, ms_p90, gmacs}], "peers": [...]}.
"""

from __future__ import annotations

import functools
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kernels.engine import Backends, Engine, _session
from kernels.profiler import percentile, time_interleaved
from model_store import fashion_mnist
from model_store.artifact import Artifact

BITS = (32, 8, 4, 2, 1)
BATCHES = (1, 32)


def torch_eager(artifact: Artifact, threads: int) -> Callable[[np.ndarray], Any] | None:
    """The bits-32 network in plain torch (eval mode, no_grad), or None when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    from kernels.onnx_graphs import _conv_weight_nchw

    torch.set_num_threads(threads)
    layers = artifact.architecture
    t = artifact.tensors
    params: dict[str, Any] = {}
    for layer in layers:
        name = layer["name"]
        if layer["type"] == "stem":
            params[name] = torch.from_numpy(np.array(t[f"{name}.weight"]))
        elif layer["type"] == "preact_block":
            for bn in ("bn1", "bn2"):
                s, b = artifact.bn(f"{name}.{bn}", 32)
                params[f"{name}.{bn}"] = (
                    torch.from_numpy(s.reshape(1, -1, 1, 1)),
                    torch.from_numpy(b.reshape(1, -1, 1, 1)),
                )
            params[f"{name}.conv1"] = torch.from_numpy(_conv_weight_nchw(artifact, f"{name}.conv1", layer["in"]))
            params[f"{name}.conv2"] = torch.from_numpy(_conv_weight_nchw(artifact, f"{name}.conv2", layer["out"]))
        else:
            s, b = artifact.bn(f"{name}.bn", 32)
            params[f"{name}.bn"] = (torch.from_numpy(s.reshape(1, -1, 1, 1)), torch.from_numpy(b.reshape(1, -1, 1, 1)))
            params[f"{name}.fc"] = (
                torch.from_numpy(np.array(t[f"{name}.fc.weight"])),
                torch.from_numpy(np.array(t[f"{name}.fc.bias"])),
            )

    def forward(images: np.ndarray) -> Any:
        with torch.no_grad():
            x = torch.from_numpy(images.reshape(-1, 1, 28, 28)).float() / 255.0
            for layer in layers:
                name = layer["name"]
                if layer["type"] == "stem":
                    x = F.conv2d(x, params[name], padding=2)
                elif layer["type"] == "preact_block":
                    s, b = params[f"{name}.bn1"]
                    h = F.conv2d(F.relu(x * s + b), params[f"{name}.conv1"], padding=1, stride=layer["stride"])
                    s, b = params[f"{name}.bn2"]
                    h = F.conv2d(F.relu(h * s + b), params[f"{name}.conv2"], padding=1)
                    sc = x[:, :, :: layer["stride"], :: layer["stride"]]
                    if layer["out"] != layer["in"]:
                        sc = F.pad(sc, (0, 0, 0, 0, 0, layer["out"] - layer["in"]))
                    x = sc + h
                else:
                    s, b = params[f"{name}.bn"]
                    w, bias = params[f"{name}.fc"]
                    x = F.linear(F.relu(x * s + b).mean(dim=(2, 3)), w, bias)
            return x.numpy()

    return forward


def bench(
    artifact: Artifact,
    threads: int = 1,
    bits_list: Sequence[int] = BITS,
    batches: Sequence[int] = BATCHES,
    backends: Backends | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    engine = Engine(artifact, threads=threads, backends=backends)
    test = fashion_mnist.load("test")
    images = test.images[: max(batches)].reshape(-1, 784)
    macs = float(artifact.manifest.get("macs_per_image", 0))
    runs: dict[tuple[str, int], Callable[[], Any]] = {}
    for bits in bits_list:
        engine.warm(bits)
        for batch in batches:
            runs[str(bits), batch] = functools.partial(engine.run, images[:batch], bits)
    from kernels.onnx_graphs import fp32_graph

    session = _session(fp32_graph(artifact).SerializeToString(), threads)
    peer_runners: dict[str, Callable[[np.ndarray], Any]] = {
        "onnxruntime-fp32": lambda x: session.run(
            None, {"image": (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)}
        )
    }
    eager = torch_eager(artifact, threads)
    if eager is not None:
        peer_runners = {"torch-fp32-eager": eager, **peer_runners}
    for name, run in peer_runners.items():
        for batch in batches:
            runs[name, batch] = functools.partial(run, images[:batch])
    # every row in rounds, so a swing of the machine's speed lands on all of them alike
    timed = time_interleaved(runs, min_runs=5)
    rows, peers = [], []
    for (key, batch), (walls, _) in timed.items():
        median = statistics.median(walls)
        if key in peer_runners:
            peers.append({"name": key, "batch": batch, "ms_median": round(median, 4)})
            label = f"peer {key:<18}"
        else:
            bits = int(key)
            rows.append(
                {
                    "bits": bits,
                    "batch": batch,
                    "backend": engine.backend(bits),
                    "ms_median": round(median, 4),
                    "ms_p90": round(percentile(walls, 90), 4),
                    "gmacs": round(macs * batch / (median / 1000) / 1e9, 3),
                }
            )
            label = f"{bits:>2} bits {rows[-1]['backend']:<13}"
        if progress:
            print(f"bench: {label} batch {batch:>3} {median:9.3f} ms", file=sys.stderr, flush=True)
    return {"model": artifact.name, "threads": threads, "macs_per_image": macs, "rows": rows, "peers": peers}
