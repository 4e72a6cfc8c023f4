"""Triton Python backend model: Riffusion img2img, the same engine the music service runs
locally (services.music.riffusion.DiffusionEngine). The bgm package must be installed in
the Triton server's Python environment (see deploy/README.md)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton server

from services.music.riffusion import DiffusionEngine


def _scalar(request: Any, name: str) -> Any:
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        model = parameters.get("MODEL", {}).get("string_value", "riffusion/riffusion-model-v1")
        device = parameters.get("DEVICE", {}).get("string_value", "auto")
        if device == "auto" and args.get("model_instance_kind") == "GPU":
            # Triton places each instance on a GPU of its own: use that one, not the first.
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        # A LoRA adapter (services.music.train) on top of the model: the LORA parameter, else
        # BGM_MUSIC_LORA in the server's environment (the music service names the same folder
        # so that its prompts use the adapter's words).
        lora = parameters.get("LORA", {}).get("string_value", "") or os.environ.get("BGM_MUSIC_LORA", "")
        scale = parameters.get("LORA_SCALE", {}).get("string_value", "") or os.environ.get("BGM_MUSIC_LORA_SCALE", "1")
        self.engine = DiffusionEngine(model, device, lora, float(scale))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                image = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                seeds = pb_utils.get_input_tensor_by_name(request, "SEEDS").as_numpy().reshape(-1)
                prompt_from, prompt_to = (_scalar(request, n) for n in ("PROMPT_FROM", "PROMPT_TO"))
                out = self.engine.render(
                    np.asarray(image, dtype=np.uint8),
                    prompt_from.decode() if isinstance(prompt_from, bytes) else str(prompt_from),
                    prompt_to.decode() if isinstance(prompt_to, bytes) else str(prompt_to),
                    float(_scalar(request, "BLEND")), int(seeds[0]), int(seeds[1]), float(_scalar(request, "WALK")),
                    int(_scalar(request, "STEPS")), float(_scalar(request, "GUIDANCE")),
                    float(_scalar(request, "STRENGTH")))
                tensor = pb_utils.Tensor("SPECTROGRAM", out.astype(np.float32))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]
