"""Mask-conditioned denoisers through diffusers, behind one interface.

- `unet` (default): a pixel-space `UNet2DModel` that sees the image and the mask concatenated at the input,
  trained from scratch (presets `tiny` for tests, `small` for CPU runs at 64–128 px, `base` for GPUs).
- `controlnet`: a ControlNet made from a local Stable-Diffusion-1.5-style folder (vae/, unet/, text_encoder/,
  tokenizer/, scheduler/), conditioned on the mask; the loss lives in latent space and only the ControlNet trains.

The training loop and LAW only use the `Denoiser` interface: `encode` (images → loss-space targets),
`forward(noisy, t, cond)` (the model output: ε̂, v̂ or the flow velocity, per `spec.prediction`),
`condition(masks, drop)`, `decode`, `feature_module()` for LAW's hook, `save_pretrained(folder)`;
`load_denoiser(folder)` reads any of them back. How targets, timesteps and samplers follow from
`spec.prediction` and the saved scheduler lives in `recipe.py`.

Conditioning: one channel per foreground label at image resolution, lesion +1 / elsewhere −1. The null
condition (classifier-free guidance) is all zeros, a value no real mask produces.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from lawder_core.errors import DataError, EnvironmentProblem, LawderError, UsageError
from lawder_core.models.configs import BACKBONES, PRESETS, SPEC_FILE, check_prediction
from lawder_core.models.recipe import (
    TIMESTEP_SPACINGS,
    TrainingScheduler,
    load_scheduler,
    training_scheduler,
)

# Without accelerate, diffusers warns on every load unless told not to try its low-memory path.
LOAD_KWARGS: dict[str, Any] = {"local_files_only": True,
                               "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
# What lawder saved itself is always safetensors: refusing anything else means a planted pickle is never opened.
SAVED_LOAD_KWARGS: dict[str, Any] = {**LOAD_KWARGS, "use_safetensors": True}
DAMAGED_RUN = ("The run folder is damaged or was not written by lawder: train it again "
               "(`lawder train-law --out RUN --force`) or restore the folder from a copy.")




@dataclass(frozen=True)
class DenoiserSpec:
    """What a saved denoiser is: enough to rebuild it and to know which masks it takes."""

    backbone: str = "unet"
    preset: str = "small"  # unet only
    size: int = 64  # image side in pixels
    image_channels: int = 3
    label_names: tuple[str, ...] = ("background", "lesion")
    num_train_timesteps: int = 1000
    # The defaults are the original recipe (epsilon, linear schedule), so a saved spec without these fields loads
    # as what it was
    # and DenoiserSpec() still builds it; new runs pass prediction="v" (or "flow"),
    # beta_schedule="squaredcos_cap_v2" and timestep_spacing="trailing".
    beta_schedule: str = "linear"  # unet v/epsilon only; flow has no betas, controlnet takes the checkpoint's
    prediction: str = "epsilon"  # 'v' | 'flow' | 'epsilon' (recipe.PREDICTIONS); controlnet: epsilon only
    timestep_spacing: str = "leading"  # sampling spacing recorded in a new unet v/epsilon run's scheduler
    pretrained: str = ""  # controlnet: the Stable-Diffusion-style folder
    prompt: str = ""  # controlnet: the text prompt every sample is conditioned on

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise UsageError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}.")
        if self.backbone == "unet" and self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r}; expected one of {tuple(PRESETS)}.")
        check_prediction(self.prediction)
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise UsageError(f"unknown timestep spacing {self.timestep_spacing!r}; expected one of "
                             f"{TIMESTEP_SPACINGS}.")
        if self.backbone == "controlnet" and self.prediction != "epsilon":
            raise UsageError(f"the controlnet backbone keeps its checkpoint's epsilon target, not {self.prediction!r}.",
                             "Leave --prediction at epsilon for --backbone controlnet.")
        if self.backbone == "controlnet" and not self.pretrained:
            raise UsageError("the controlnet backbone needs --pretrained PATH, a local Stable Diffusion 1.5-style "
                             "folder with vae/, unet/, scheduler/ (and text_encoder/, tokenizer/).")
        if len(self.label_names) < 2:
            raise DataError(f"label names {self.label_names} must include background and at least one label.")

    @property
    def cond_channels(self) -> int:
        return len(self.label_names) - 1


class Denoiser(nn.Module):
    """The interface the training loop, LAW and the sampler rely on."""

    spec: DenoiserSpec
    scheduler: TrainingScheduler  # the training schedule; saved with the model, sampling is built from its config

    def encode(self, images: Tensor) -> Tensor:
        """Images (B,C,H,W) in [0, 1] → the clean targets x0 in loss space."""
        raise NotImplementedError

    def decode(self, x0: Tensor) -> Tensor:
        """Loss-space samples → images (B,C,H,W) in [0, 1]."""
        raise NotImplementedError

    def loss_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one loss-space sample."""
        raise NotImplementedError

    def forward(self, noisy: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """The model output (ε̂, v̂ or flow velocity) for noisy loss-space inputs; `cond` from `condition`."""
        raise NotImplementedError

    def trainable_module(self) -> nn.Module:
        """The part that trains, EMA tracks and `save_pretrained` writes (the UNet, or the ControlNet)."""
        raise NotImplementedError

    def feature_module(self, name: str = "") -> nn.Module:
        """Where LAW's forward hook goes: by default the denoising UNet's last decoder block."""
        from lawder_core.models.law import resolve_feature_module

        return resolve_feature_module(self.denoising_unet(), name)

    def denoising_unet(self) -> nn.Module:
        raise NotImplementedError

    @property
    def feature_channels(self) -> int:
        return int(self.denoising_unet().config.block_out_channels[0])

    def condition(self, masks: Tensor, drop: Tensor | None = None) -> Tensor:
        """Label masks (B,H,W) → (B, labels−1, H, W) in {−1, +1}; rows where `drop` is True become 0 (null)."""
        labels = torch.arange(1, self.spec.cond_channels + 1, device=masks.device)
        cond = (masks[:, None] == labels[None, :, None, None]).float() * 2 - 1
        if drop is not None:
            cond = cond * (~drop).float()[:, None, None, None]
        return cond

    def null_condition(self, masks: Tensor) -> Tensor:
        return self.condition(masks, torch.ones(masks.shape[0], dtype=torch.bool, device=masks.device))

    def zero_mask_inputs(self) -> bool:
        """Where the mask enters through the first convolution (the pixel UNet), zero its weights there; True if it
        did. Every mask then gives the null condition's prediction until training moves them: what a fine-tune
        from a model that never saw a mask should start from, as ControlNet starts its zero convolutions. A
        ControlNet is left as it is (False)."""
        return False

    def save_pretrained(self, folder: str | os.PathLike, module: nn.Module | None = None) -> Path:
        """Spec + scheduler + the trainable module (or `module`, e.g. the EMA copy) in diffusers layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self.spec), indent=2))
        self.scheduler.save_pretrained(folder / "scheduler")
        (module or self.trainable_module()).save_pretrained(folder / self.trainable_subfolder)
        return folder

    trainable_subfolder = "unet"


# ---------------------------------------------------------------- pixel space


def build_unet2d(spec: DenoiserSpec) -> UNet2DModel:
    p = PRESETS[spec.preset]
    levels = len(p["block_out_channels"])
    if spec.size % 2 ** (levels - 1):
        raise UsageError(f"--size {spec.size} must be divisible by {2 ** (levels - 1)} for preset {spec.preset!r}.")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in p["attention"])
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p["attention"]))
    return UNet2DModel(
        sample_size=spec.size, in_channels=spec.image_channels + spec.cond_channels,
        out_channels=spec.image_channels, block_out_channels=p["block_out_channels"],
        layers_per_block=p["layers_per_block"], down_block_types=down, up_block_types=up,
        norm_num_groups=p["norm_num_groups"], attention_head_dim=8,
    )


class PixelDenoiser(Denoiser):
    """UNet2DModel on [image, mask] concatenated, in pixel space with images scaled to [−1, 1].

    A new denoiser builds its training scheduler from the spec (`recipe.training_scheduler`); a loaded one keeps
    the scheduler its run saved, so an old run keeps its target and timestep spacing.
    """

    trainable_subfolder = "unet"

    def __init__(self, spec: DenoiserSpec, unet: UNet2DModel | None = None,
                 scheduler: TrainingScheduler | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.unet = unet if unet is not None else build_unet2d(spec)
        self.scheduler = scheduler or training_scheduler(spec.prediction, spec.beta_schedule,
                                                         spec.num_train_timesteps, spec.timestep_spacing)

    def encode(self, images: Tensor) -> Tensor:
        return images * 2 - 1

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0.float() + 1) / 2).clamp(0, 1)

    def loss_shape(self) -> tuple[int, int, int]:
        return (self.spec.image_channels, self.spec.size, self.spec.size)

    def forward(self, noisy: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        return self.unet(torch.cat([noisy, cond.to(noisy.dtype)], dim=1), timesteps).sample

    def trainable_module(self) -> nn.Module:
        return self.unet

    def denoising_unet(self) -> nn.Module:
        return self.unet

    def zero_mask_inputs(self) -> bool:
        with torch.no_grad():  # the mask channels follow the image's in the first convolution's input
            self.unet.conv_in.weight[:, self.spec.image_channels:] = 0
        return True


# ---------------------------------------------------------------- ControlNet on Stable Diffusion


def _load_part(cls: Any, folder: Path, sub: str, kwargs: dict[str, Any] | None = None) -> Any:
    try:
        return cls.from_pretrained(folder / sub, **(kwargs or {"local_files_only": True}))
    except (OSError, ValueError) as err:
        raise EnvironmentProblem(
            f"cannot load {sub}/ from the pretrained folder {folder}: {err}",
            "Pass --pretrained a local Stable Diffusion 1.5-style folder (vae/, unet/, scheduler/, text_encoder/, "
            "tokenizer/) saved with diffusers' save_pretrained; nothing is downloaded.",
        ) from err


def encode_prompt(folder: Path, prompt: str, cross_attention_dim: int) -> Tensor:
    """The prompt's CLIP embeddings (1, L, D), computed once: the text encoder is frozen and then dropped.

    A folder without text_encoder/ works with the empty prompt only (zero embeddings).
    """
    if not (folder / "text_encoder").is_dir():
        if prompt:
            raise UsageError(f"{folder} has no text_encoder/: a prompt cannot be used with it.",
                             "Leave --prompt empty, or add the text encoder and tokenizer to the folder.")
        return torch.zeros(1, 77, cross_attention_dim)
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise EnvironmentProblem("the controlnet backbone needs the `transformers` package for its text encoder.",
                                 "pip install transformers") from err
    tokenizer = _load_part(CLIPTokenizer, folder, "tokenizer")
    text_encoder = _load_part(CLIPTextModel, folder, "text_encoder")
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0].float()


def conditioning_embedding_channels(vae_scale: int) -> tuple[int, ...]:
    """ControlNet's mask encoder must downsample exactly as much as the VAE does."""
    steps = int(math.log2(vae_scale))
    if 2 ** steps != vae_scale or steps > 3:
        raise EnvironmentProblem(f"unsupported VAE downsampling factor {vae_scale} (expected 1, 2, 4 or 8).")
    return (16, 32, 96, 256)[: steps + 1]


class ControlNetDenoiser(Denoiser):
    """SD-1.5-style latent diffusion with a ControlNet on the mask; VAE, UNet and text encoder stay frozen."""

    trainable_subfolder = "controlnet"

    def __init__(self, spec: DenoiserSpec, controlnet: ControlNetModel | None = None) -> None:
        super().__init__()
        self.spec = spec
        folder = Path(spec.pretrained)
        if not folder.is_dir():
            raise EnvironmentProblem(f"the pretrained folder {folder} does not exist.",
                                     "Pass --pretrained a local Stable Diffusion 1.5-style folder.")
        self.vae = _load_part(AutoencoderKL, folder, "vae", LOAD_KWARGS).requires_grad_(False)
        self.unet = _load_part(UNet2DConditionModel, folder, "unet", LOAD_KWARGS).requires_grad_(False)
        self.scheduler = _load_part(DDPMScheduler, folder, "scheduler")
        self.scheduler.register_to_config(prediction_type="epsilon")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if spec.size % (self.vae_scale * unet_factor):
            raise UsageError(f"--size {spec.size} must be divisible by {self.vae_scale * unet_factor} for this "
                             "Stable Diffusion checkpoint.")
        self.controlnet = controlnet if controlnet is not None else ControlNetModel.from_unet(
            self.unet, conditioning_channels=spec.cond_channels,
            conditioning_embedding_out_channels=conditioning_embedding_channels(self.vae_scale),
        )
        dim = int(self.unet.config.cross_attention_dim)
        # Buffers (not parameters) so they follow .to(device) and stay out of optimisers and checkpoints.
        self.register_buffer("prompt_embeds", encode_prompt(folder, spec.prompt, dim), persistent=False)
        self.register_buffer("null_prompt_embeds", encode_prompt(folder, "", dim), persistent=False)
        self.vae.eval()
        self.unet.eval()

    def train(self, mode: bool = True) -> ControlNetDenoiser:
        super().train(mode)
        self.vae.eval()  # frozen parts never switch to training behaviour
        self.unet.eval()
        return self

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        latents = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.sample()
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        images = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def loss_shape(self) -> tuple[int, int, int]:
        side = self.spec.size // self.vae_scale
        return (int(self.vae.config.latent_channels), side, side)

    def forward(self, noisy: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        # A null mask goes with the empty prompt: that pair is the unconditional branch of guidance.
        is_null = cond.flatten(1).abs().amax(dim=1) == 0
        text = torch.where(is_null[:, None, None], self.null_prompt_embeds, self.prompt_embeds).to(noisy.dtype)
        down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=text,
                                    controlnet_cond=cond.to(noisy.dtype), return_dict=False)
        return self.unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    def trainable_module(self) -> nn.Module:
        return self.controlnet

    def denoising_unet(self) -> nn.Module:
        return self.unet


# ---------------------------------------------------------------- build / load


def build_denoiser(spec: DenoiserSpec) -> Denoiser:
    return PixelDenoiser(spec) if spec.backbone == "unet" else ControlNetDenoiser(spec)


def read_spec(folder: str | os.PathLike) -> DenoiserSpec:
    path = Path(folder) / SPEC_FILE
    if not path.exists():
        raise DataError(f"{folder} is not a saved lawder denoiser (no {SPEC_FILE}).",
                        "Point at a run folder written by `lawder train-law`.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or bytes that are not UTF-8
        raise DataError(f"{path} is not valid JSON ({err}).", DAMAGED_RUN) from err
    problem = _spec_problem(data)
    if problem:
        raise DataError(f"{path} is not a denoiser spec lawder wrote: {problem}.", DAMAGED_RUN)
    data["label_names"] = tuple(data.get("label_names", ("background", "lesion")))
    try:
        return DenoiserSpec(**data)
    except LawderError as err:  # a value refused as a command-line option (UsageError) is a damaged file here
        raise DataError(f"{path}: {err.message}", DAMAGED_RUN) from err


def _spec_problem(data: Any) -> str | None:
    """What is wrong with a spec file's JSON (None: nothing): each field must have its default's type.

    Checked before `DenoiserSpec(**data)` so a wrong type is named here, not met later as a TypeError.
    """
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    defaults = {f.name: f.default for f in fields(DenoiserSpec)}
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        return f"unknown fields {unknown} (written by another version of lawder?)"
    for name, value in data.items():
        want = type(defaults[name])
        if want is tuple:
            ok, wanted = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
        else:  # a bool is an int to Python but never a number here; a float field may be written as `2`
            accepted = (int, float) if want is float else want
            ok, wanted = isinstance(value, accepted) and not isinstance(value, bool), f"a JSON {want.__name__}"
        if not ok:
            return f"field {name!r} is {value!r}; expected {wanted}"
    for name in ("size", "image_channels", "num_train_timesteps"):
        if data.get(name, 1) < 1:
            return f"field {name!r} is {data[name]}; expected a positive integer"
    return None


def load_saved_module(cls: Any, folder: Path) -> Any:
    """A module lawder saved (`folder` is e.g. RUN/last/denoiser_ema/unet): safetensors only, never a pickle."""
    if not any(folder.glob("*.safetensors")):  # said here: diffusers would log its own lookup failure first
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        why = f" (only pickled weights {pickles}, which lawder never loads)" if pickles else ""
        raise DataError(f"{folder} holds no safetensors weights{why}.", DAMAGED_RUN)
    try:
        return cls.from_pretrained(folder, **SAVED_LOAD_KWARGS)
    except (OSError, ValueError, RuntimeError) as err:  # torn weights, bad config.json, shapes that do not match
        why = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])  # a state-dict error runs long
        raise DataError(f"cannot load the denoiser weights in {folder}: {why}", DAMAGED_RUN) from err


def _load_saved_scheduler(folder: Path, prediction: str) -> TrainingScheduler:
    try:
        return load_scheduler(folder, prediction)
    except (OSError, ValueError, TypeError) as err:  # missing file, bad JSON, a config of the wrong shape
        raise DataError(f"cannot read the scheduler saved in {folder}: {err}", DAMAGED_RUN) from err


def load_denoiser(folder: str | os.PathLike, pretrained: str | None = None) -> Denoiser:
    """Read back what `save_pretrained` wrote; `pretrained` relocates a moved Stable Diffusion folder.

    Any damaged file of the run is a DataError naming it; weights are read from safetensors only.
    """
    folder = Path(folder)
    spec = read_spec(folder)
    if pretrained:
        spec = replace(spec, pretrained=str(pretrained))
    scheduler = _load_saved_scheduler(folder / "scheduler", spec.prediction)
    if spec.backbone == "unet":
        unet = load_saved_module(UNet2DModel, folder / "unet")
        return PixelDenoiser(spec, unet, scheduler)
    controlnet = load_saved_module(ControlNetModel, folder / "controlnet")
    denoiser = ControlNetDenoiser(spec, controlnet)
    denoiser.scheduler = scheduler
    return denoiser


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Parameter/buffer copy between two instances of the same architecture (EMA ↔ live)."""
    with torch.no_grad():
        for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
            b.copy_(a)
