"""LoRA fine-tuning of the Riffusion UNet on a dataset from ``services.music.dataset``.

    python -m services.music.train DATASET --base MODEL -o ADAPTER [--steps 1000] [--rank 4] ...

Only the LoRA matrices on the UNet's attention projections learn (peft); the VAE and the
text encoder stay frozen, so every clip's latents and every caption's embedding are
computed once, before the first step. The loss is the usual denoising one: noise a clip's
latents at a random timestep, predict the noise (or the velocity, as the base model's
scheduler says), mean squared error.

Every random draw of a step (which clips, the noise, the timesteps) comes from a generator
seeded by (seed, step), and checkpoints keep the adapter and the optimizer's state: a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
ADAPTER/checkpoints/step-N holds each checkpoint and, unless ``--no-validation``, one render
per emotion of the dataset (image and audio) made with the adapter as it was then. The
adapter itself is saved in diffusers' LoRA format with bgm's captions vocabulary beside it
(``services.music.lora``); the music service loads it with ``BGM_MUSIC_LORA=ADAPTER``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bgm import logs, models, vocab
from services.music import lora as lora_adapter
from services.music import spectrogram
from services.music.dataset import DatasetError, read_metadata

log = logs.get("bgm.music.train")
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
EVAL_SEED = 1_000_003  # the fixed batch the evaluation loss is measured on
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    dataset: Path
    base: str
    out: Path
    rank: int = 4
    alpha: int | None = None  # None: the rank (scale 1)
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no, fp16, bf16 (GPU)
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    resume: str = ""  # "", "latest" or a checkpoint folder
    seed: int = 0
    device: str = vocab.AUTO
    validation: bool = True
    validation_steps: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        problems = [
            (self.rank >= 1, "--rank must be 1 or more"),
            (self.learning_rate > 0, "--learning-rate must be positive"),
            (self.steps >= 1, "--steps must be 1 or more"),
            (self.batch_size >= 1, "--batch-size must be 1 or more"),
            (self.gradient_accumulation >= 1, "--gradient-accumulation must be 1 or more"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be 0 (only at the end) or more"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "--mixed-precision must be no, fp16 or bf16"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)


@dataclass
class Outcome:
    adapter: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimiser step
    eval_loss_start: float = math.nan
    eval_loss_end: float = math.nan
    seconds_per_step: float = math.nan
    checkpoints: list[Path] = field(default_factory=list)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        try:
            import torch
            from diffusers import DDPMScheduler, StableDiffusionImg2ImgPipeline
            from peft import LoraConfig
        except ImportError as exc:
            raise RuntimeError(f"training needs torch, diffusers and peft (pip install 'bgm[music-full]'): {exc}") \
                from exc
        self.torch, self.config = torch, config
        self.device = models.torch_device(config.device)
        if config.mixed_precision != "no" and not self.device.startswith("cuda"):
            raise ValueError(f"--mixed-precision {config.mixed_precision} needs a GPU; on {self.device} use no")
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            config.mixed_precision]
        self.rows = read_metadata(config.dataset)
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(config.base, dtype=self.weight_dtype,
                                                              safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for part in (pipe.vae, pipe.text_encoder, pipe.unet):
            part.requires_grad_(False)
        self.pipe = pipe.to(self.device)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.latents, self.embeddings, self.caption_of = self._encode()
        torch.manual_seed(config.seed)  # the LoRA matrices' initial values
        self.lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank,
                                      init_lora_weights="gaussian", target_modules=TARGET_MODULES)
        self.unet = pipe.unet
        self.unet.add_adapter(self.lora_config)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        for p in self.params:  # the trained matrices stay in float32 under mixed precision
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate)
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        log.info("training set up", extra={"fields": {
            "clips": len(self.rows), "base": config.base, "device": self.device, "rank": config.rank,
            "trainable_params": sum(p.numel() for p in self.params)}})

    # --- data ------------------------------------------------------------------------------

    def _encode(self) -> tuple[Any, Any, list[int]]:
        """Every clip's latents (VAE mean, scaled) and every distinct caption's embedding."""
        from PIL import Image

        torch, pipe = self.torch, self.pipe
        latents = []
        with torch.no_grad():
            for start in range(0, len(self.rows), 8):
                images = []
                for row in self.rows[start : start + 8]:
                    try:
                        pixels = np.asarray(Image.open(str(row["path"])).convert("RGB"), dtype=np.float32)
                    except OSError as exc:
                        raise DatasetError(f"{row['path']}: cannot read the image ({exc})") from exc
                    if pixels.shape[:2] != (spectrogram.PARAMS.n_mels, spectrogram.PARAMS.width):
                        raise DatasetError(f"{row['path']}: {pixels.shape[1]}x{pixels.shape[0]} px; clips are "
                                           f"{spectrogram.PARAMS.width}x{spectrogram.PARAMS.n_mels}")
                    images.append(torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1))
                batch = torch.stack(images).to(self.device, self.weight_dtype)
                latents.append(pipe.vae.encode(batch).latent_dist.mean.float() * pipe.vae.config.scaling_factor)
            captions = sorted({str(row["text"]) for row in self.rows})
            tok = pipe.tokenizer
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            embeddings = pipe.text_encoder(ids)[0].float()
        index = {c: i for i, c in enumerate(captions)}
        return torch.cat(latents), embeddings, [index[str(row["text"])] for row in self.rows]

    def _draw(self, generator: Any, count: int) -> tuple[Any, Any, Any, Any]:
        torch = self.torch
        picks = torch.randint(0, len(self.rows), (count,), generator=generator)
        latents = self.latents[picks.to(self.latents.device)]
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (count,), generator=generator)
        context = self.embeddings[torch.tensor([self.caption_of[int(i)] for i in picks], device=self.device)]
        return latents, noise, timesteps.to(self.device), context

    def _loss(self, latents: Any, noise: Any, timesteps: Any, context: Any) -> Any:
        torch, scheduler = self.torch, self.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with torch.autocast(self.device.split(":")[0], dtype=self.weight_dtype,
                            enabled=self.weight_dtype != torch.float32):
            predicted = self.unet(noisy.to(self.weight_dtype), timesteps, context.to(self.weight_dtype)).sample
        return torch.nn.functional.mse_loss(predicted.float(), target.float())

    def eval_loss(self) -> float:
        """The loss on one fixed draw (up to 8 clips, fixed noise and timesteps): comparable
        between checkpoints, unlike the training loss of random batches."""
        torch = self.torch
        generator = torch.Generator().manual_seed(self.config.seed + EVAL_SEED)
        with torch.no_grad():
            return float(self._loss(*self._draw(generator, min(8, len(self.rows)))))

    # --- steps and checkpoints -------------------------------------------------------------

    def step(self, step: int) -> float:
        """One optimiser step (gradient accumulation inside); its random draws depend only on
        (seed, step)."""
        torch, c = self.torch, self.config
        self.unet.train()
        total = 0.0
        for micro in range(c.gradient_accumulation):
            generator = torch.Generator().manual_seed((c.seed * 1_000_000_007 + step * 1_009 + micro) % 2**63)
            loss = self._loss(*self._draw(generator, c.batch_size)) / c.gradient_accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        for group in self.optimizer.param_groups:
            group["lr"] = c.learning_rate * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else c.learning_rate
        apply_gradients(self.params, self.optimizer, self.scaler, c.max_grad_norm)
        return total

    def lora_state(self) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}

    def save_checkpoint(self, step: int, losses: list[float], eval_loss_start: float) -> Path:
        from safetensors.torch import save_file

        folder = self.config.out / CHECKPOINTS / f"step-{step:06d}"
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file(self.lora_state(), str(partial / "lora.safetensors"))
        state = {"optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None}
        self.torch.save(state, partial / "optimizer.pt")
        state_json = {"step": step, "losses": losses, "eval_loss_start": eval_loss_start,
                      "config": _jsonable(asdict(self.config))}
        (partial / "state.json").write_text(json.dumps(state_json, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)  # a checkpoint is whole or absent, even if training is killed while saving
        self._prune()
        return folder

    def _prune(self) -> None:
        keep = self.config.keep_checkpoints
        if keep <= 0:
            return
        for old in checkpoints(self.config.out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> tuple[int, list[float], float | None]:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = json.loads((folder / "state.json").read_text())
        set_peft_model_state_dict(self.unet, {k: v.to(self.device) for k, v in
                                              load_file(str(folder / "lora.safetensors")).items()})
        for p in self.params:
            p.data = p.data.float()
        saved = self.torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        start = state.get("eval_loss_start")
        return int(state["step"]), [float(x) for x in state["losses"]], None if start is None else float(start)

    # --- the adapter -----------------------------------------------------------------------

    def vocabulary(self) -> dict[str, lora_adapter.Vocabulary]:
        """Per emotion, the mood and instruments most of its clips were captioned with."""
        words: dict[str, lora_adapter.Vocabulary] = {}
        for emotion in vocab.EMOTIONS:
            rows = [r for r in self.rows if r.get(vocab.EMOTION_TAG) == emotion]
            if rows:
                mood = Counter(str(r.get("mood", "")) for r in rows).most_common(1)[0][0]
                kits: Counter[tuple[str, ...]] = Counter(_names(r.get("instruments")) for r in rows)
                words[emotion] = lora_adapter.Vocabulary(mood, kits.most_common(1)[0][0])
        return words

    def info(self, steps: int) -> lora_adapter.AdapterInfo:
        c = self.config
        return lora_adapter.AdapterInfo(c.base, c.rank, float(c.alpha or c.rank), steps, self.vocabulary())

    def save_adapter(self, folder: Path, steps: int, extra: dict[str, Any]) -> Path:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        folder.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=convert_state_dict_to_diffusers(self.lora_state()),
            weight_name=lora_adapter.WEIGHTS, unet_lora_adapter_metadata=_jsonable(self.lora_config.to_dict()))
        data = self.info(steps).to_json() | extra
        (folder / lora_adapter.INFO).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        return folder

    def validate(self, folder: Path) -> list[Path]:
        """One render per emotion of the dataset, from noise alone (strength 1): what the
        adapter's prompt for that emotion now sounds like. PNG and WAV."""
        import soundfile
        from PIL import Image

        from services.music.riffusion import DiffusionEngine

        engine = DiffusionEngine.from_pipeline(self.pipe)
        info = self.info(0)
        blank = np.full((spectrogram.PARAMS.n_mels, spectrogram.PARAMS.width, 3), 255, dtype=np.uint8)
        written = []
        self.unet.eval()
        for emotion in info.vocabulary:
            levels = [float(str(r["max_value"])) for r in self.rows if r.get(vocab.EMOTION_TAG) == emotion]
            max_value = float(np.median(levels))
            image = engine.render(blank, info.prompt(emotion), info.prompt(emotion), 0.0, self.config.seed,
                                  self.config.seed + 1, 0.0, self.config.validation_steps, 7.0, 1.0)
            pixels = np.clip(image, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{emotion}.png")
            audio = spectrogram.image_to_audio(pixels, max_value, device=self.device)
            peak = float(np.abs(audio).max()) or 1.0
            soundfile.write(folder / f"{emotion}.wav", audio * (0.9 / peak), spectrogram.PARAMS.sample_rate)
            written.append(folder / f"{emotion}.wav")
        return written


def apply_gradients(params: list[Any], optimizer: Any, scaler: Any, max_grad_norm: float) -> None:
    """Clip the accumulated gradients and take the optimiser's step (through the fp16 scaler
    when there is one), then clear them."""
    import torch

    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _names(value: object) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list | tuple) else ()


def checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")) \
        if folder.is_dir() else []


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in (sorted(value, key=str) if isinstance(value, set | frozenset) else value)]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def resume_from(config: TrainConfig) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "latest":
        found = checkpoints(config.out)
        if not found:
            raise ValueError(f"--resume latest: {config.out / CHECKPOINTS} has no checkpoint")
        return found[-1]
    folder = Path(config.resume)
    if not (folder / "state.json").is_file():
        raise ValueError(f"--resume {folder}: not a checkpoint (no state.json)")
    return folder


def train(config: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> Outcome:
    """Trains, checkpoints, validates and saves the adapter in ``config.out``."""
    resume = resume_from(config)
    trainer = Trainer(config)
    start, losses, first_eval = trainer.load_checkpoint(resume) if resume else (0, [], None)
    if start > config.steps:
        raise ValueError(f"the checkpoint is at step {start}, past --steps {config.steps}")
    # The evaluation loss before any training, also when this run resumes another.
    outcome = Outcome(config.out, config.steps, losses,
                      eval_loss_start=first_eval if first_eval is not None else trainer.eval_loss())
    progress = _progress(config, start)
    interrupted = False

    def stop(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, stop) if _main_thread() else None
    stepping, done = 0.0, 0  # time in the steps themselves, not in checkpoints and renders
    eval_loss, evaluated_at = float("nan"), -1  # the last checkpoint's, and its step
    try:
        for step in range(start, config.steps):
            began = time.perf_counter()
            loss = trainer.step(step)
            stepping += time.perf_counter() - began
            losses.append(loss)
            done += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
            if on_step:
                on_step(step + 1, loss)
            at_checkpoint = config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
            if at_checkpoint or interrupted or step + 1 == config.steps:
                folder = trainer.save_checkpoint(step + 1, losses, outcome.eval_loss_start)
                outcome.checkpoints.append(folder)
                if config.validation and not interrupted:
                    trainer.validate(folder)
                eval_loss, evaluated_at = trainer.eval_loss(), step + 1
                log.info("checkpoint", extra={"fields": {"step": step + 1, "loss": round(loss, 5),
                                                         "eval_loss": round(eval_loss, 5),
                                                         "folder": str(folder)}})
            if interrupted:
                raise KeyboardInterrupt(f"stopped at step {step + 1}; resume with --resume latest")
    finally:
        if progress is not None:
            progress.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    outcome.seconds_per_step = stepping / max(1, done)
    # The last step always checkpoints and measures: a forward pass over the clips, not taken twice.
    outcome.eval_loss_end = eval_loss if evaluated_at == config.steps else trainer.eval_loss()
    outcome.losses = losses
    trainer.save_adapter(config.out, config.steps, {
        "eval_loss_start": outcome.eval_loss_start, "eval_loss_end": outcome.eval_loss_end,
        "clips": len(trainer.rows), "learning_rate": config.learning_rate, "seed": config.seed})
    return outcome


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(config: TrainConfig, start: int) -> Any:
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc="LoRA", unit="step", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.music.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="a folder made by python -m services.music.dataset")
    parser.add_argument("--base", default="riffusion/riffusion-model-v1", help="hub name or folder of the base model")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the adapter folder")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="0 keeps all")
    parser.add_argument("--resume", default="", help="'latest' or a checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=vocab.AUTO)
    parser.add_argument("--no-validation", action="store_true", help="no renders at checkpoints")
    parser.add_argument("--validation-steps", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        config = TrainConfig(args.dataset, args.base, args.out, args.rank, args.alpha, args.learning_rate,
                             args.warmup_steps, args.steps, args.batch_size, args.gradient_accumulation,
                             args.max_grad_norm, args.mixed_precision, args.checkpoint_every, args.keep_checkpoints,
                             args.resume, args.seed, args.device, not args.no_validation, args.validation_steps)
        outcome = train(config)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    print(f"adapter: {outcome.adapter} ({outcome.steps} steps, {outcome.seconds_per_step:.2f} s/step); "
          f"evaluation loss {outcome.eval_loss_start:.4f} -> {outcome.eval_loss_end:.4f}")
    print(f"use it: BGM_MUSIC_BACKEND={vocab.MUSIC_RIFFUSION} BGM_MUSIC_RIFFUSION_MODEL={config.base} "
          f"BGM_MUSIC_LORA={outcome.adapter}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
