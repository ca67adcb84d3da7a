"""The baseline a user would write: plain FastAPI + onnxruntime int8 of the same model, one request per
session.run, no batching, no scheduler.

It speaks the same KServe v2 infer path as apserve (binary tensors in, JSON logits out), so the same load
client drives both. The ONNX graph is kernels.onnx_graphs.fp32_graph (the fp32-activation network with its
8-bit weights, exactly what `bits=32` computes), quantized with onnxruntime's own static int8
quantization (QDQ, per-channel weights, u8 activations) calibrated on Fashion-MNIST test images: what a
user exporting their model and following onnxruntime's quantization guide would serve.

    python bench/baseline_server.py --port 8100            # builds the model once under $TMPDIR/apserve-bench
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_store import artifact as artifact_store  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "apserve-bench"


def _calibration_images(n: int = 256) -> np.ndarray:
    try:
        from model_store import fashion_mnist

        images = fashion_mnist.load("test").images[:n]
    except Exception:  # no dataset: random pixels still give onnxruntime ranges to calibrate on
        images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return (images.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)


def build_int8_onnx(model_path: Path = artifact_store.BUNDLED) -> Path:
    """Build (or reuse, keyed by the artifact's payload hash) the fp32 graph and its static int8 version."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from kernels.onnx_graphs import fp32_graph

    model = artifact_store.load(model_path)
    key = str(model.manifest["payload_sha256"])[:16]
    fp32, int8 = CACHE / f"baseline-{key}-fp32.onnx", CACHE / f"baseline-{key}-int8.onnx"
    if int8.is_file():
        return int8
    CACHE.mkdir(parents=True, exist_ok=True)
    onnx.save(fp32_graph(model), str(fp32))
    images = _calibration_images()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": images[i : i + 32]} for i in range(0, len(images), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(fp32),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return int8


def create_baseline_app(onnx_path: Path, threads: int = 1) -> FastAPI:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        body = await request.body()
        n = int(request.headers["inference-header-content-length"])
        header = json.loads(body[:n])
        tensor = header["inputs"][0]
        pixels = np.frombuffer(body[n:], dtype=np.uint8 if tensor["datatype"] == "UINT8" else np.float32)
        images = pixels.reshape(-1, 1, 28, 28).astype(np.float32)
        if tensor["datatype"] == "UINT8":
            images /= 255.0
        logits = session.run(None, {"image": images})[0]
        out = {"model_name": model_name, "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(logits.shape), "data": logits.ravel().tolist()}]}  # fmt: skip
        return Response(json.dumps(out), media_type="application/json")

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", type=Path, default=artifact_store.BUNDLED)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--build-only", action="store_true", help="build the ONNX model, print its path, exit")
    args = parser.parse_args()
    path = build_int8_onnx(args.model)
    if args.build_only:
        print(path)
        return 0
    import uvicorn

    uvicorn.run(create_baseline_app(path, args.threads), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
