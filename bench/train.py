"""Seconds per LoRA training step: the tiny Stable Diffusion pipeline the tests build, on this
machine's CPU, through ``services.music.train`` itself (a dataset from two of the shipped
mood-tagged tracks); and the full-size SD 1.5 UNet (its architecture, random weights) with
a rank-8 LoRA at batch 1, on a GPU where there is one (fp16 autocast, as
``--mixed-precision fp16`` trains), else on the CPU only when asked (``--full-cpu-steps``).

    python -m bench.train [--steps 10] [--full-steps 20] [--full-cpu-steps 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def tiny(steps: int, work: Path) -> dict[str, float]:
    import immich_memories_music

    from services.music import dataset
    from services.music.train import TrainConfig, Trainer
    from tests.tiny_models import tiny_stable_diffusion

    tracks = Path(immich_memories_music.__file__).parent / "tracks"
    sources = [str(tracks / "happy" / "happy_acoustic_1.opus"), str(tracks / "nostalgic" / "nostalgic_acoustic_1.opus")]
    began = time.perf_counter()
    dataset.build(sources, work / "dataset", max_clips_per_track=4, log=False)
    built = time.perf_counter() - began
    base = tiny_stable_diffusion(work / "sd")
    figures = {"dataset_s": built}
    for rank in (4, 8):
        began = time.perf_counter()
        trainer = Trainer(TrainConfig(work / "dataset", str(base), work / f"adapter-{rank}", rank=rank, steps=steps,
                                      device="cpu", validation=False, progress=False))
        figures[f"setup_rank{rank}_s"] = time.perf_counter() - began
        trainer.step(0)  # warm-up
        times = []
        for step in range(1, steps + 1):
            began = time.perf_counter()
            trainer.step(step)
            times.append(time.perf_counter() - began)
        figures[f"s_per_step_rank{rank}"] = statistics.median(times)
    return figures


def full_size(steps: int, device: str) -> dict[str, float]:
    """SD 1.5's UNet (random weights) with rank-8 LoRA on its attention projections."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from services.music.train import TARGET_MODULES, apply_gradients

    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    unet.requires_grad_(False)
    half = device.startswith("cuda")
    unet.to(device, torch.float16 if half else torch.float32)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if half else None
    scheduler: Any = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents = torch.randn(1, 4, 64, 64, device=device)
    context = torch.randn(1, 77, 768, device=device)

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device=device)
        with torch.autocast(device.split(":")[0], dtype=torch.float16, enabled=half):
            predicted = unet(scheduler.add_noise(latents, noise, t), t, context).sample
        loss = torch.nn.functional.mse_loss(predicted.float(), noise)
        (scaler.scale(loss) if scaler else loss).backward()
        apply_gradients(params, optimizer, scaler, 1.0)

    def sync() -> None:
        if half:
            torch.cuda.synchronize()

    step()  # warm-up (kernels, allocator)
    sync()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    figures = {"s_per_step": statistics.median(times), "trainable_params": float(sum(p.numel() for p in params))}
    if half:
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the tiny pipeline")
    parser.add_argument("--full-steps", type=int, default=20, help="timed steps of the full-size UNet on a GPU")
    parser.add_argument("--full-cpu-steps", type=int, default=0, help="time the full-size UNet on the CPU too")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="bgm-bench-train-") as work:
        figures = tiny(args.steps, Path(work))
    print(f"tiny pipeline, CPU ({torch.get_num_threads()} threads): dataset of 8 clips built in "
          f"{figures['dataset_s']:.1f} s; batch 1: rank 4 {figures['s_per_step_rank4']:.3f} s/step, "
          f"rank 8 {figures['s_per_step_rank8']:.3f} s/step (set-up {figures['setup_rank4_s']:.1f} s)")
    if torch.cuda.is_available():
        gpu = full_size(args.full_steps, "cuda")
        print(f"SD 1.5 UNet + LoRA rank 8, batch 1, fp16 autocast on {torch.cuda.get_device_name()}: "
              f"{gpu['s_per_step']:.3f} s/step, {gpu['trainable_params']:.0f} trainable parameters, "
              f"peak {gpu['peak_gpu_mib']:.0f} MiB")
    else:
        print("SD 1.5 UNet + LoRA rank 8 on a GPU: no GPU on this machine")
    if args.full_cpu_steps:
        cpu = full_size(args.full_cpu_steps, "cpu")
        print(f"SD 1.5 UNet + LoRA rank 8, batch 1, float32 on the CPU: {cpu['s_per_step']:.1f} s/step")


if __name__ == "__main__":
    main()
