"""A randomly initialised, tiny Stable-Diffusion-1.5-style folder (vae/, unet/, text_encoder/, tokenizer/,
scheduler/), built and saved locally so the ControlNet path is tested without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

CROSS_DIM = 16


def tiny_vocab() -> dict[str, int]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def save_text_parts(folder: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 8
    tokenizer.save_pretrained(folder / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")


def build_tiny_sd(folder: Path, with_text: bool = True) -> Path:
    """Image 32 px → latent 16 px (VAE factor 2), a two-level cross-attention UNet."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    ).save_pretrained(folder / "vae")
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=4, norm_num_groups=8,
    ).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False).save_pretrained(folder / "scheduler")
    if with_text:
        save_text_parts(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder
