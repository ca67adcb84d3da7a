"""The baseline a user would write: plain FastAPI + onnxruntime int8 of the same model, one request per
session.run, no batching, no scheduler.

It speaks the same KServe v2 infer path as apserve (binary tensors in, JSON logits out), so the same load
client drives both. The ONNX graph is built here from the artifact (the fp32-activation network with its
8-bit weights, exactly what `bits=32` computes) and quantized with onnxruntime's own static int8
quantization (QDQ, per-channel weights, u8 activations), calibrated on Fashion-MNIST test images.
kernels/ has no ONNX graph builder yet; when it has one, use it here.

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

from kernels.reference import dequantized_weight  # noqa: E402
from model_store import artifact as artifact_store  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "apserve-bench"


def build_fp32_onnx(model: artifact_store.Artifact, path: Path) -> Path:
    """The network as an fp32 ONNX graph (NCHW, input 'image' float32 [B, 1, 28, 28] in [0, 1])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def bn_relu(x: str, bn: str) -> str:
        scale, shift = model.bn(bn, 32)
        c = scale.shape[0]
        nodes.append(helper.make_node("Mul", [x, const(f"{bn}.s", scale.reshape(1, c, 1, 1))], [f"{bn}.m"]))
        nodes.append(helper.make_node("Add", [f"{bn}.m", const(f"{bn}.b", shift.reshape(1, c, 1, 1))], [f"{bn}.a"]))
        nodes.append(helper.make_node("Relu", [f"{bn}.a"], [f"{bn}.r"]))
        return f"{bn}.r"

    def conv(x: str, name: str, weight: np.ndarray, stride: int, pad: int) -> str:
        w = const(f"{name}.w", weight.astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, w], [name], strides=[stride, stride], pads=[pad] * 4))
        return name

    x = "image"
    for layer in model.architecture:
        name = layer["name"]
        if layer["type"] == "stem":
            x = conv(x, name, model.tensors[f"{name}.weight"], 1, layer["kernel"] // 2)
        elif layer["type"] == "preact_block":
            cin, cout, stride = layer["in"], layer["out"], layer["stride"]
            w1 = dequantized_weight(model, f"{name}.conv1", 32, 9 * cin).reshape(3, 3, cin, cout).transpose(3, 2, 0, 1)
            w2 = (
                dequantized_weight(model, f"{name}.conv2", 32, 9 * cout).reshape(3, 3, cout, cout).transpose(3, 2, 0, 1)
            )
            h = conv(bn_relu(x, f"{name}.bn1"), f"{name}.conv1", w1, stride, 1)
            h = conv(bn_relu(h, f"{name}.bn2"), f"{name}.conv2", w2, 1, 1)
            shortcut = x
            if stride != 1:
                starts, ends = const(f"{name}.st", np.array([0, 0])), const(f"{name}.en", np.array([1 << 30] * 2))
                axes, steps = const(f"{name}.ax", np.array([2, 3])), const(f"{name}.sp", np.array([stride] * 2))
                nodes.append(helper.make_node("Slice", [x, starts, ends, axes, steps], [f"{name}.sub"]))
                shortcut = f"{name}.sub"
            if cin != cout:
                pads = const(f"{name}.pads", np.array([0, 0, 0, 0, 0, cout - cin, 0, 0]))
                nodes.append(helper.make_node("Pad", [shortcut, pads], [f"{name}.pad"]))
                shortcut = f"{name}.pad"
            nodes.append(helper.make_node("Add", [shortcut, h], [f"{name}.out"]))
            x = f"{name}.out"
        else:
            r = bn_relu(x, f"{name}.bn")
            nodes.append(helper.make_node("GlobalAveragePool", [r], [f"{name}.gap"]))
            nodes.append(helper.make_node("Flatten", [f"{name}.gap"], [f"{name}.flat"]))
            w, b = model.tensors[f"{name}.fc.weight"], model.tensors[f"{name}.fc.bias"]
            gemm_in = [f"{name}.flat", const(f"{name}.fc.w", w), const(f"{name}.fc.b", b)]
            nodes.append(helper.make_node("Gemm", gemm_in, ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "fashion-resnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(onnx_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, str(path))
    return path


def _calibration_images(n: int = 256) -> np.ndarray:
    try:
        from model_store import fashion_mnist

        images = fashion_mnist.load("test").images[:n]
    except Exception:  # no dataset: random pixels still give onnxruntime ranges to calibrate on
        images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return (images.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)


def build_int8_onnx(model_path: Path = artifact_store.BUNDLED) -> Path:
    """Build (or reuse, keyed by the artifact's payload hash) the fp32 graph and its static int8 version."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = artifact_store.load(model_path)
    key = str(model.manifest["payload_sha256"])[:16]
    fp32, int8 = CACHE / f"baseline-{key}-fp32.onnx", CACHE / f"baseline-{key}-int8.onnx"
    if int8.is_file():
        return int8
    build_fp32_onnx(model, fp32)
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
        logits = session.run(["logits"], {"image": images})[0]
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
