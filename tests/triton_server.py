"""A small server speaking Triton's gRPC inference protocol (the definitions that ship in
tritonclient) hosting a Python-backend model.py, as Triton would, with a minimal stand-in
for the server-provided module ``triton_python_backend_utils``."""

from __future__ import annotations

import importlib.util
import json
import queue
import re
import sys
import threading
import types
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
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
    text = (MODEL_DIR / "config.pbtxt").read_text()
    pairs = re.findall(r'parameters:\s*\{\s*key:\s*"(\w+)",\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}\s*\}', text)
    return {key: {"string_value": value} for key, value in pairs}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # as on the wire: UINT8, FP32, BYTES ...
    dims: tuple[int, ...]
    optional: bool = False

    def accepts(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.dims) and all(d in (-1, s) for d, s in zip(self.dims, shape, strict=True))


@dataclass(frozen=True)
class ModelConfig:
    """What Triton reads from config.pbtxt to check a request before the model sees it."""

    name: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    instances: int


def _tensors(text: str, section: str) -> dict[str, TensorSpec]:
    block = re.search(rf"^{section}\s*\[(.*?)^\]", text, re.S | re.M)
    assert block, f"config.pbtxt has no {section}"
    specs = {}
    for entry in re.findall(r"\{([^{}]*)\}", block.group(1)):
        name = re.search(r'name:\s*"(\w+)"', entry)
        kind = re.search(r"data_type:\s*TYPE_(\w+)", entry)
        dims = re.search(r"dims:\s*\[([^\]]*)\]", entry)
        assert name and kind and dims, entry
        datatype = "BYTES" if kind.group(1) == "STRING" else kind.group(1)
        specs[name.group(1)] = TensorSpec(name.group(1), datatype, tuple(int(d) for d in dims.group(1).split(",")),
                                          optional=bool(re.search(r"optional:\s*true", entry)))
    return specs


def shipped_config() -> ModelConfig:
    text = (MODEL_DIR / "config.pbtxt").read_text()
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    name = re.search(r'^name:\s*"(\w+)"', text, re.M)
    batch = re.search(r"^max_batch_size:\s*(\d+)", text, re.M)
    count = re.search(r"instance_group\s*\[\s*\{[^}]*count:\s*(\d+)", text)
    assert name and batch and count
    return ModelConfig(name.group(1), int(batch.group(1)), _tensors(text, "input"), _tensors(text, "output"),
                       int(count.group(1)))


def check_request(config: ModelConfig, request: Any) -> str | None:
    """Triton's own checks of an inference request against the model configuration: the
    reason it would refuse it (INVALID_ARGUMENT), or None."""
    given = {spec.name: spec for spec in request.inputs}
    for name in given.keys() - config.inputs.keys():
        return f"unexpected inference input '{name}' for model '{config.name}'"
    for name, spec in config.inputs.items():
        if name not in given:
            if spec.optional:
                continue
            return f"expected {len(config.inputs)} inputs but got {len(given)} inputs for model '{config.name}'. " \
                   f"Got input(s) {sorted(given)}, but missing required input(s) ['{name}']"
        if given[name].datatype != spec.datatype:
            return f"inference input '{name}' data-type is '{given[name].datatype}', but model '{config.name}' " \
                   f"expects '{spec.datatype}'"
        shape = list(given[name].shape)
        if config.max_batch_size > 0:
            if not shape or shape[0] > config.max_batch_size:
                return f"inference request batch-size must be <= {config.max_batch_size} for '{config.name}'"
            shape = shape[1:]
        if not spec.accepts(shape):
            return f"unexpected shape for input '{name}' for model '{config.name}'. Expected " \
                   f"{list(spec.dims)}, got {list(given[name].shape)}"
    for output in request.outputs:
        if output.name not in config.outputs:
            return f"unexpected inference output '{output.name}' for model '{config.name}'"
    return None


def load_model(pipeline: Path, device: str = "cpu", **parameters: str) -> Any:
    sys.modules["triton_python_backend_utils"] = backend_utils()
    spec = importlib.util.spec_from_file_location("riffusion_triton_model", MODEL_DIR / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    values = {"MODEL": str(pipeline), "DEVICE": device, **parameters}
    config = {"parameters": {k: {"string_value": v} for k, v in values.items()}}
    model.initialize({"model_config": json.dumps(config)})
    return model


class Server:
    """A running server: ``address``, and the most executions it ever had at once."""

    def __init__(self, grpc_server: grpc.Server, address: str) -> None:
        self.grpc_server, self.address = grpc_server, address
        self.peak_executing = 0
        self.refused: list[str] = []
        self.model_ready = True  # False: the model is still loading

    def stop(self, grace: float | None = 0) -> None:
        self.grpc_server.stop(grace)


def start(instances: Any, name: str | None = None, config: ModelConfig | None = None) -> Server:
    """Serve ``instances`` (a model.py instance, or one per config.pbtxt instance) as Triton
    would: each request checked against the shipped config first, each instance running one
    request at a time, as many requests at once as there are instances."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    config = config or shipped_config()
    name = name or config.name
    pb_utils = sys.modules["triton_python_backend_utils"]
    free: queue.Queue[Any] = queue.Queue()
    for instance in instances if isinstance(instances, list) else [instances]:
        free.put(instance)
    executing = [0]
    lock = threading.Lock()
    server: Server

    class Inference(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return service_pb2.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=True)

        def ModelReady(self, request, context):
            return service_pb2.ModelReadyResponse(ready=request.name == name and server.model_ready)

        def ModelInfer(self, request, context):
            if request.model_name != name:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.model_name}'")
            problem = check_request(config, request)
            if problem is None and len(request.raw_input_contents) != len(request.inputs):
                problem = "inputs must be sent as raw_input_contents, one per input"
            if problem is not None:
                server.refused.append(problem)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            tensors = []
            for spec, raw in zip(request.inputs, request.raw_input_contents, strict=True):
                if spec.datatype == "BYTES":
                    array = deserialize_bytes_tensor(raw)
                else:
                    array = np.frombuffer(raw, dtype=triton_to_np_dtype(spec.datatype))
                tensors.append(pb_utils.Tensor(spec.name, array.reshape(list(spec.shape))))
            instance = free.get()
            with lock:
                executing[0] += 1
                server.peak_executing = max(server.peak_executing, executing[0])
            try:
                [response] = instance.execute([pb_utils.InferenceRequest(tensors)])
            finally:
                with lock:
                    executing[0] -= 1
                free.put(instance)
            if response.error is not None:
                context.abort(grpc.StatusCode.INTERNAL, response.error.message())
            reply = service_pb2.ModelInferResponse(model_name=name)
            for tensor in response.output_tensors:
                spec = config.outputs[tensor.name()]
                array = np.ascontiguousarray(tensor.as_numpy(), dtype=triton_to_np_dtype(spec.datatype))
                assert spec.accepts(array.shape), (tensor.name(), array.shape)
                reply.outputs.add(name=tensor.name(), datatype=spec.datatype, shape=list(array.shape))
                reply.raw_output_contents.append(array.tobytes())
            return reply

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                              options=[("grpc.max_send_message_length", 64 * 2**20),
                                       ("grpc.max_receive_message_length", 64 * 2**20)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    server = Server(grpc_server, f"127.0.0.1:{port}")
    return server
