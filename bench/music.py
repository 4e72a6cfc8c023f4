"""Music generation cost: seconds of compute per second of music for each backend, and
seconds per diffusion step of a full-size SD 1.5 UNet (860 M parameters, built from its
config with random weights) at 512x512 with classifier-free guidance (batch 2).

The Riffusion row runs the whole path (seed images, img2img, Griffin-Lim) with a tiny
pipeline, so it measures everything but the UNet's real size; with the full UNet the
diffusion part costs steps x (seconds per step) per 5.12 s clip on top.

    python -m bench.music [--seconds 30] [--unet-steps 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def unet_seconds_per_step(steps: int, device: str) -> float:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768,  # type: ignore[attr-defined]
                                attention_head_dim=8).to(device).eval()
    if device == "cuda":
        unet = unet.half()
    dtype = torch.float16 if device == "cuda" else torch.float32
    params = sum(p.numel() for p in unet.parameters())
    latents = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    context = torch.randn(2, 77, 768, device=device, dtype=dtype)
    with torch.inference_mode():
        unet(latents, 999, encoder_hidden_states=context)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for t in range(steps):
            unet(latents, 999 - t, encoder_hidden_states=context)
        if device == "cuda":
            torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / steps
    print(f"SD 1.5 UNet ({params / 1e6:.0f} M parameters) on {device}: {per_step:.2f} s per step "
          "(512x512, batch 2 for guidance)")
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--unet-steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    spans = [("joy", 0.0, args.seconds / 2), ("sadness", args.seconds / 2, args.seconds)]

    from services.music.composer import ComposerBackend
    from services.music.riffusion import CLIP_SECONDS, RiffusionBackend, plan_clips
    from tests.tiny_models import tiny_stable_diffusion

    composer = ComposerBackend()
    started = time.perf_counter()
    composer.generate(spans, sample_rate=44_100, seed=1, tempo=None)
    composer_rate = (time.perf_counter() - started) / args.seconds
    print(f"composer: {composer_rate:.4f} s of compute per s of music")

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_stable_diffusion(Path(tmp) / "sd")
        riffusion = RiffusionBackend(str(model), "cpu", steps=30)
        started = time.perf_counter()
        riffusion.generate(spans, sample_rate=44_100, seed=1, tempo=None)
        tiny_rate = (time.perf_counter() - started) / args.seconds
    print(f"riffusion path with a tiny UNet, 30 steps: {tiny_rate:.3f} s of compute per s of music")

    per_step = unet_seconds_per_step(args.unet_steps, args.device)
    clips_per_second = len(plan_clips(spans, 0.5, riffusion.span_tempos(spans, None))) / args.seconds
    steps = round(30 * 0.75)  # 30 steps at denoising strength 0.75
    full_rate = tiny_rate + clips_per_second * steps * per_step
    print(f"estimated full Riffusion on {args.device}: {full_rate:.1f} s of compute per s of music "
          f"({steps} denoising steps per {CLIP_SECONDS:.2f} s clip)")
    print(f"ratio full Riffusion / composer: {full_rate / composer_rate:.0f}x")


if __name__ == "__main__":
    main()
