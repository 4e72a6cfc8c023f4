"""A small server speaking Triton's gRPC inference protocol (the definitions that ship in
tritonclient) hosting a Python-backend model.py, as Triton would, with a minimal stand-in
for the server-provided module ``triton_python_backend_utils``."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

MODEL_DIR = Path(__file__).resolve().parent.parent / "deploy" / "triton" / "model_repository" / "riffusion"


def backend_utils() -> types.ModuleType:
    """What Triton's Python backend gives a model.py: tensors, requests, responses, errors."""
    module = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self._name, self._array = name, array

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

    class InferenceRequest:
        def __init__(self, inputs: list[Tensor]) -> None:
            self.inputs = {t.name(): t for t in inputs}

    class TritonError:
        def __init__(self, message: str) -> None:
            self._message = message

        def message(self) -> str:
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor:
        if name not in request.inputs:
            raise KeyError(f"missing input {name}")
        return request.inputs[name]

    module.Tensor = Tensor  # type: ignore[attr-defined]
    module.InferenceRequest = InferenceRequest  # type: ignore[attr-defined]
    module.InferenceResponse = InferenceResponse  # type: ignore[attr-defined]
    module.TritonError = TritonError  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = get_input_tensor_by_name  # type: ignore[attr-defined]
    return module


def shipped_parameters() -> dict[str, dict[str, str]]:
    """The ``parameters`` of the shipped config.pbtxt, as Triton hands them to model.py."""
    import re

    text = (MODEL_DIR / "config.pbtxt").read_text()
    pairs = re.findall(r'parameters:\s*\{\s*key:\s*"(\w+)",\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}\s*\}', text)
    return {key: {"string_value": value} for key, value in pairs}


def load_model(pipeline: Path, device: str = "cpu") -> Any:
    sys.modules["triton_python_backend_utils"] = backend_utils()
    spec = importlib.util.spec_from_file_location("riffusion_triton_model", MODEL_DIR / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = {"parameters": {"MODEL": {"string_value": str(pipeline)}, "DEVICE": {"string_value": device}}}
    model.initialize({"model_config": json.dumps(config)})
    return model


def start(model: Any, name: str = "riffusion") -> tuple[grpc.Server, str]:
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    pb_utils = sys.modules["triton_python_backend_utils"]

    class Inference(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return service_pb2.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=True)

        def ModelReady(self, request, context):
            return service_pb2.ModelReadyResponse(ready=request.name == name)

        def ModelInfer(self, request, context):
            if request.model_name != name:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name}")
            tensors = []
            for spec, raw in zip(request.inputs, request.raw_input_contents, strict=True):
                if spec.datatype == "BYTES":
                    array = deserialize_bytes_tensor(raw)
                else:
                    array = np.frombuffer(raw, dtype=triton_to_np_dtype(spec.datatype))
                tensors.append(pb_utils.Tensor(spec.name, array.reshape(list(spec.shape))))
            [response] = model.execute([pb_utils.InferenceRequest(tensors)])
            if response.error is not None:
                context.abort(grpc.StatusCode.INTERNAL, response.error.message())
            reply = service_pb2.ModelInferResponse(model_name=name)
            for tensor in response.output_tensors:
                array = np.ascontiguousarray(tensor.as_numpy(), dtype=np.float32)
                reply.outputs.add(name=tensor.name(), datatype="FP32", shape=list(array.shape))
                reply.raw_output_contents.append(array.tobytes())
            return reply

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.max_send_message_length", 64 * 2**20),
                                  ("grpc.max_receive_message_length", 64 * 2**20)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"
