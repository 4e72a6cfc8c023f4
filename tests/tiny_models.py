"""Tiny models with the same config shapes as the full ones, random weights, built and
saved by the tests themselves: the real loading code runs on them, no download, no mock."""

from __future__ import annotations

from pathlib import Path

# j-hartmann/emotion-english-distilroberta-base's label order.
HARTMANN_LABELS = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]

CORPUS = [
    "I am so happy today", "this is terrible and sad", "what a surprise", "I am afraid",
    "that is disgusting", "stop it now, I am angry", "the meeting is at noon",
]


def tiny_text_classifier(directory: Path, labels: list[str] = HARTMANN_LABELS, favourite: str | None = None) -> Path:
    """A 2-layer RoBERTa sequence classifier and a byte-level BPE tokenizer, saved to ``directory``.

    ``favourite`` biases the classifier so that label wins on any input, which lets a test
    check that the label mapping, not luck, decides the answer.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(directory))
    tokenizer = RobertaTokenizerFast(vocab_file=str(directory / "vocab.json"),
                                     merges_file=str(directory / "merges.txt"))
    tokenizer.save_pretrained(directory)

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        problem_type="single_label_classification",
    )
    model = RobertaForSequenceClassification(config).eval()
    if favourite is not None:
        with torch.no_grad():
            model.classifier.out_proj.bias[labels.index(favourite)] += 20.0
    model.save_pretrained(directory)
    return directory


def demucs_package(model: object) -> dict:
    """The dict demucs.states.serialize_model writes (which needs omegaconf only for the
    training arguments, which a checkpoint for inference does not use)."""
    from demucs.states import get_state

    args, kwargs = model._init_args_kwargs  # type: ignore[attr-defined]
    return {"klass": model.__class__, "args": args, "kwargs": kwargs,
            "state": get_state(model, None, half=False), "training_args": {}}


def tiny_htdemucs(path: Path, sources: tuple[str, ...] = ("drums", "bass", "other", "vocals")) -> Path:
    """An HTDemucs of the htdemucs architecture (hybrid time/frequency branches, cross-domain
    transformer) made very narrow, random weights, saved as demucs saves checkpoints."""
    import torch
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(0)
    model = HTDemucs(sources=list(sources), audio_channels=2, channels=8, depth=4,
                     t_layers=1, t_heads=2, samplerate=44100, segment=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(demucs_package(model), path)
    return path


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2, CLIP) uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in range(256)]


def tiny_stable_diffusion(directory: Path) -> Path:
    """A Stable Diffusion img2img pipeline of SD 1.x's structure made tiny, random weights:
    UNet with cross-attention, a VAE that downsamples 8x (so 512x512 images and 64x64
    latents, like Riffusion), a CLIP text encoder and a CLIP tokenizer, saved as diffusers does."""
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"),
                              model_max_length=77)

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(directory / "pipeline")  # type: ignore[attr-defined]
    return directory / "pipeline"
