"""The toy backbone: a tiny QwenImageTransformer2DModel editing small RGB images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import safe_open

from clora.backbone import Backbone, PromptEmbeds
from clora_toy.config import AFFINE_PARAMS, EvalConfig, ModelConfig, ToyConfig
from clora_toy.data import general_batch, make_sources, name_seed
from clora_toy.text import HashTokenizer

#: what an effect LoRA (a toy teacher) adapts, named as in the real Qwen-Image-Edit transformer
EFFECT_LORA_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
]

#: what a new LoRA (the distiller's student and critic) adapts: the effect LoRAs' modules, plus the
#: text-stream MLP and the image input/output projections. One LoRA that serves many effects gains
#: from them (measured: sepia + invert 32.84 dB mean vs 32.33 with the effect modules alone, same step
#: time; benchmarks/README.md); a single-effect teacher does not need them.
LORA_TARGET_MODULES = [*EFFECT_LORA_MODULES, "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_in", "proj_out"]

RGB = 3


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    frame = max(2, (head_dim // 4) // 2 * 2)
    side = (head_dim - frame) // 2 // 2 * 2
    return (head_dim - 2 * side, side, side)


def position_features(cfg: ModelConfig) -> torch.Tensor:
    """``[tokens, 4K]``: sin and cos of ``pi*k*u`` for k = 1..K of each patch's centred row and column.

    ``u`` is in (-1, 1) and a mirror maps ``u`` to ``-u``, so attention between these features
    (``cos(pi*k*(u + u'))`` summed over k) can pick out a token's mirror image.
    """
    n, k = cfg.image_size // cfg.patch_size, cfg.position_frequencies
    u = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / (n / 2)
    angles = torch.pi * u[:, None] * torch.arange(1, k + 1, dtype=torch.float32)[None, :]
    axis = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [n, 2K]
    rows = axis[:, None, :].expand(n, n, 2 * k)
    cols = axis[None, :, :].expand(n, n, 2 * k)
    return torch.cat([rows, cols], dim=-1).reshape(n * n, 4 * k)


def output_channels(cfg: ModelConfig) -> int:
    """Channels per pixel the transformer outputs (its ``proj_out`` gives ``patch_size**2`` of them
    per patch): RGB, and under 'affine' also the patch's colour matrix and bias spread over its pixels."""
    return RGB + (AFFINE_PARAMS // cfg.patch_size**2 if cfg.prediction == "affine" else 0)


def build_transformer(cfg: ModelConfig) -> QwenImageTransformer2DModel:
    """A freshly initialised (seeded) transformer; noisy target, source and position features are
    concatenated by channel."""
    packed = RGB * cfg.patch_size**2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return QwenImageTransformer2DModel(
            patch_size=cfg.patch_size,
            in_channels=2 * packed + 4 * cfg.position_frequencies,
            out_channels=output_channels(cfg),
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.text_hidden,
            axes_dims_rope=_rope_axes(cfg.head_dim),
        )


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[B, (H/p)(W/p), C*p*p]``, the Qwen-Image latent packing."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def clean_image(out: torch.Tensor, source: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The clean image ``[B, tokens, 3*p*p]`` (packed) that a non-velocity output of the transformer
    stands for, given the packed source image."""
    if cfg.prediction == "edit":
        clean = out + source
    elif cfg.prediction == "affine":
        # per patch: (I + A) applied to each source pixel's RGB, plus b, plus a residual per pixel;
        # a colour effect is one constant A and b over the whole image, whatever the image
        b, tokens, _ = source.shape
        pixels = cfg.patch_size**2
        eye = torch.eye(RGB, dtype=out.dtype, device=out.device)
        matrix = out[..., : RGB * RGB].reshape(b, tokens, RGB, RGB) + eye
        bias = out[..., RGB * RGB : AFFINE_PARAMS].reshape(b, tokens, RGB, 1)
        residual = out[..., AFFINE_PARAMS:].reshape(b, tokens, RGB, pixels)
        pixels_rgb = source.reshape(b, tokens, RGB, pixels)  # pack() keeps a patch's channels apart
        clean = (matrix @ pixels_rgb + bias + residual).reshape(b, tokens, RGB * pixels)
    else:
        clean = out
    return clean.clamp(-1, 1) if cfg.clip_clean else clean


def unpack(latents: torch.Tensor, size: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`pack` for square images of side ``size``."""
    b, _, ch = latents.shape
    c, n = ch // (patch * patch), size // patch
    x = latents.view(b, n, n, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, size, size)


class ToyBackbone(Backbone):
    """Loaded toy base: transformer, frozen text encoder, and pixel 'latents' in [-1, 1]."""

    image_size: tuple[int, int]  # the toy edits one fixed size

    def __init__(
        self,
        base_id: str,
        cfg: ModelConfig,
        teacher_sampler: EvalConfig,
        fingerprint: str,
        transformer: QwenImageTransformer2DModel,
        text_encoder: torch.nn.Module | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.base_id = base_id
        self.config = cfg
        # the recipe's teacher sampler is what distill, eval and generate use (the build scores with it)
        self.default_teacher_steps = teacher_sampler.teacher_steps
        self._teacher_guidance = teacher_sampler.teacher_guidance
        self._fingerprint = fingerprint
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = HashTokenizer(cfg.text_vocab, cfg.text_max_words)
        self.device = device
        self.dtype = dtype
        self.image_size = (cfg.image_size, cfg.image_size)
        self._prompt_cache: dict[str, PromptEmbeds] = {}
        self._positions = position_features(cfg).to(device, dtype)

    @property
    def lora_target_modules(self) -> list[str]:
        return list(LORA_TARGET_MODULES)

    @property
    def default_guidance(self) -> float:
        return self._teacher_guidance

    def sampling_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise with each image's mean per colour channel removed.

        At sigma = 1 the noise says nothing about the edit, but a toy editor can read part of the
        noise's mean colour as the image's. The velocity-output base shipped until 2026-12 did: about
        half of its edit error was a per-image colour offset that followed the noise, and sampling
        without that one direction per channel (of 1024) gained it 1-4 dB. The 'affine' base takes
        its colours from the source and gains almost nothing (benchmarks/README.md, "Toy base"); the
        noise stays so that results stay comparable. The models train on standard normal noise.
        """
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        b, tokens, channels = noise.shape
        per_channel = noise.view(b, tokens, RGB, channels // RGB)
        return (per_channel - per_channel.mean(dim=(1, 3), keepdim=True)).view(shape)

    @property
    def sampling_noise_id(self) -> str:
        return "normal-minus-channel-mean"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def sample_sources(self, n: int, seed: int) -> torch.Tensor:
        return make_sources(n, self.config.image_size, name_seed("sources", seed))

    def general_edits(self, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        sources, _, prompts = general_batch(n, self.config.image_size, name_seed("general", seed))
        return sources, prompts

    def ground_truth(self, effect_name: str, images: torch.Tensor) -> torch.Tensor | None:
        from clora_toy.effects import find_effect

        effect = find_effect(effect_name)
        if effect is None or effect.stochastic:
            return None
        return effect.apply(images.float()).to(images)

    def truth_draws(self, effect_name: str, images: torch.Tensor, n: int, seed: int) -> torch.Tensor | None:
        """``n`` draws ``[n,B,3,H,W]`` of a stochastic toy effect (``Effect.draws``: a CPU generator seeded
        from the effect's name and ``seed``), computed in float32 and returned on the images' device and
        dtype; None for a deterministic or unknown effect."""
        from clora_toy.effects import find_effect

        effect = find_effect(effect_name)
        if effect is None or not effect.stochastic:
            return None
        return effect.draws(images.detach().float().cpu(), n, seed).to(images)

    def offload_encoders(self) -> None:
        # prompts already encoded stay cached; a new prompt after this is a programming error
        self.text_encoder = None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: torch.Tensor | None = None) -> PromptEmbeds:
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        if missing:
            if self.text_encoder is None:
                raise RuntimeError(f"text encoder released; cannot encode new prompts {missing[:3]}")
            ids, mask = self.tokenizer(missing)
            hidden = self.text_encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            states = hidden.last_hidden_state.to(self.dtype)
            for i, p in enumerate(missing):
                n = int(mask[i].sum())
                self._prompt_cache[p] = PromptEmbeds(
                    states[i : i + 1, :n], mask[i : i + 1, :n].to(self.device)
                )
        return PromptEmbeds.cat([self._prompt_cache[p] for p in prompts])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, self.dtype)
        return pack(images * 2 - 1, self.config.patch_size)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = unpack(latents, self.config.image_size, self.config.patch_size)
        return ((images + 1) / 2).clamp(0, 1)

    def predict_velocity(
        self,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        source: torch.Tensor,
        prompts: PromptEmbeds,
    ) -> torch.Tensor:
        b = noisy.shape[0]
        side = self.config.image_size // self.config.patch_size
        sigma = torch.as_tensor(sigma, device=self.device, dtype=self.dtype).expand(b)
        # the position channels are empty when the recipe has none
        inputs = [noisy, source, self._positions.expand(b, -1, -1)]
        # timestep = sigma, as the Qwen-Image pipelines pass t/1000 and the embedder scales by 1000.
        out = self.transformer(
            hidden_states=torch.cat(inputs, dim=-1),
            encoder_hidden_states=prompts.embeds,
            encoder_hidden_states_mask=prompts.mask,
            timestep=sigma,
            img_shapes=[[(1, side, side)]] * b,
            return_dict=False,
        )[0]
        if self.config.prediction == "velocity":
            return out
        clean = clean_image(out, source, self.config)
        floor = torch.clamp(sigma, min=self.config.sigma_floor).view(b, 1, 1).to(out)
        return (noisy - clean) / floor


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_header(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def base_metadata(backbone: ToyBackbone, config: ToyConfig, extra: dict[str, object]) -> dict[str, str]:
    """Header of a base weights file: the full recipe, so a file explains how it was made."""
    return {
        "clora.base_id": backbone.base_id,
        "clora.toy_config": config.model_dump_json(),
        "clora.info": json.dumps(extra),
    }
