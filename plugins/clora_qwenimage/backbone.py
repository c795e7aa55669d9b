"""Qwen-Image-Edit(-Plus) as a clora backbone: diffusers' own pipeline classes, run as the pipeline runs.

The pipeline object is built from the folder with ``from_pretrained`` (safetensors only) and its own
methods do the model-specific work: ``encode_prompt`` (Qwen2.5-VL sees the source image through the
chat template), ``_encode_vae_image`` (latents normalised by the VAE's ``latents_mean``/``latents_std``),
``_pack_latents``/``_unpack_latents`` (2x2 patches as tokens), ``image_processor`` (resizing), and its
scheduler config (dynamic exponential shift by token count). The source image's latents are appended
to the noisy target's tokens with their own ``img_shapes`` entry, and the transformer's output is cut
back to the target's tokens, as in the pipeline's denoising loop. Latents are kept unpacked
``[B, z_dim, h, w]`` between calls, so every shape is known.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clora.backbone import Backbone, BackboneFactory, BaseKind, PromptEmbeds, RankRule
from clora.bases import folder_fingerprint
from clora.errors import CloraError
from clora_qwenimage.loading import load_pipeline

if TYPE_CHECKING:
    import torch

#: what the student and critic adapt: every attention projection and both streams' MLPs of each block
LORA_TARGET_MODULES = [
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
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
#: the Edit pipeline resizes its input to this many pixels (a literal in its ``__call__``)
EDIT_IMAGE_AREA = 1024 * 1024


class QwenEditKind(BaseKind):
    """A saved ``QwenImageEditPlusPipeline`` (``plus``) or ``QwenImageEditPipeline`` folder."""

    def __init__(self, kind_id: str, class_name: str, plus: bool, description: str) -> None:
        self.kind_id, self.class_name, self.plus, self.description = kind_id, class_name, plus, description
        self.options = {
            "vae_area": "pixels the source image is resized to for the VAE, its aspect kept (default: "
            "the pipeline's, 1048576 = 1024x1024); lower it to save memory, at the cost of matching "
            "what the pipeline does at inference",
            "condition_area": "pixels of the source image the prompt encoder sees (default: the "
            "pipeline's: 147456 = 384x384 for Plus, the VAE image for Edit)",
        }

    def detect(self, model_index: dict[str, Any]) -> bool:
        return model_index.get("_class_name") == self.class_name

    def factory(self, name: str, folder: Path, options: dict[str, str]) -> QwenEditFactory:
        missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise CloraError(
                f"{folder} lacks the pipeline component folder(s) {', '.join(missing)}; pass the whole "
                f"{self.class_name} folder"
            )
        for part in ("transformer", "vae", "text_encoder"):
            if not any((folder / part).glob("*.safetensors")):
                raise CloraError(
                    f"{folder / part} has no .safetensors weights (clora does not load pickled .bin "
                    "files); save the pipeline again with safe_serialization=True"
                )
        areas: dict[str, int] = {}
        for key, value in options.items():
            try:
                areas[key] = int(value)
            except ValueError:
                raise CloraError(f"option {key} takes a whole number of pixels, got {value!r}") from None
            if areas[key] < 32 * 32:
                raise CloraError(f"option {key} must be at least 1024 pixels (32x32), got {value}")
        return QwenEditFactory(name, folder, self, areas.get("vae_area"), areas.get("condition_area"))


class QwenEditFactory(BackboneFactory):
    """One recorded Qwen-Image-Edit folder."""

    def __init__(
        self, name: str, folder: Path, kind: QwenEditKind, vae_area: int | None, condition_area: int | None
    ) -> None:
        self.backbone_id, self.folder, self.edit_kind = name, folder, kind
        self.kind, self.description = kind.kind_id, kind.description
        self.vae_area, self.condition_area = vae_area, condition_area

    @functools.cached_property
    def _fingerprint(self) -> str:
        return f"{self.kind}-{folder_fingerprint(self.folder)}"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def default_dtype(self, device: str) -> str:
        return "bfloat16" if str(device).startswith("cuda") else "float32"

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "description": self.description, "path": str(self.folder)}

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        import torch
        from diffusers import QwenImageTransformer2DModel

        from clora.lora import linear_shapes

        config = QwenImageTransformer2DModel.load_config(str(self.folder / "transformer"))
        with torch.device("meta"):
            model = QwenImageTransformer2DModel.from_config(config)
        return linear_shapes(model)

    def pipeline_usage(self, lora_file: str, sigmas: list[float], shift: float, seed: int) -> str | None:
        u = [
            round((s / (shift - (shift - 1) * s)), 6) for s in sigmas
        ]  # undo the shift: the scheduler applies it
        cls = self.edit_kind.class_name
        return f"""import torch
from diffusers import FlowMatchEulerDiscreteScheduler, {cls}
from PIL import Image

# the folder of the base the LoRA was distilled on ({self.kind}, clora fingerprint {self.fingerprint})
pipe = {cls}.from_pretrained("{self.folder.name}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{lora_file}")
# clora's few-step sampler: predict x0, re-noise to the next level (shift {shift:g}, no dynamic shifting)
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
    pipe.scheduler.config, shift={shift:g}, use_dynamic_shifting=False, shift_terminal=None,
    stochastic_sampling=True,
)
torch.manual_seed({seed})  # the scheduler re-noises from torch's global generator
image = pipe(
    image=Image.open("input.png").convert("RGB"),
    prompt="<trigger> <caption>",  # an effect's prompt from the table above
    sigmas={u},
    num_inference_steps={len(sigmas)},
    true_cfg_scale=1.0,  # the distilled LoRA samples without guidance
    generator=torch.Generator().manual_seed({seed}),
).images[0]
"""

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> QwenEditBackbone:
        import torch

        dtype = dtype or torch.float32
        pipeline_class = getattr(importlib.import_module("diffusers"), self.edit_kind.class_name)
        try:
            pipe = load_pipeline(pipeline_class, self.folder, dtype)
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CloraError(
                f"cannot load the {self.edit_kind.class_name} at {self.folder}: {reason}"
            ) from None
        pipe.set_progress_bar_config(disable=True)
        pipe.to(torch.device(device))
        return QwenEditBackbone(self, pipe, torch.device(device), dtype)


class QwenEditBackbone(Backbone):
    """A loaded Qwen-Image-Edit(-Plus) pipeline."""

    prompt_sees_image = True
    negative_prompt = " "  # the pipelines' documented negative prompt for true CFG
    default_teacher_steps = 40
    default_resolution = 1024
    #: the toy's rule, capped at rank 64 for memory: student + critic with gradients and AdamW state are
    #: about 13.6 GB at rank 64 on the default modules, beside the 40.9 GB transformer (not measured on a GPU)
    student_rank = RankRule(most=64)
    size_multiple = 32  # the pipelines size images by area in multiples of 32

    def __init__(self, factory: QwenEditFactory, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.factory, self.pipe = factory, pipe
        self.base_id = factory.backbone_id
        self.transformer = pipe.transformer
        self.device, self.dtype = device, dtype
        self.plus = factory.edit_kind.plus
        self.module = importlib.import_module(type(pipe).__module__)
        self.scale = int(pipe.vae_scale_factor)  # pixels per latent
        self.channels = int(pipe.vae.config.z_dim)
        #: the encoders on ``device`` (the pipeline is loaded there; prepare moves them off after use)
        self._on_device = {"text_encoder", "vae"}

    # ---- sizes -----------------------------------------------------------------------------------

    @property
    def lora_target_modules(self) -> list[str]:
        return list(LORA_TARGET_MODULES)

    @property
    def fingerprint(self) -> str:
        return self.factory.fingerprint

    def _vae_area(self) -> int:
        # read from the pipeline module on each call, as the pipeline does
        default = (
            int(getattr(self.module, "VAE_IMAGE_SIZE", EDIT_IMAGE_AREA)) if self.plus else EDIT_IMAGE_AREA
        )
        return self.factory.vae_area or default

    def _condition_area(self) -> int | None:
        if self.factory.condition_area:
            return self.factory.condition_area
        return int(self.module.CONDITION_IMAGE_SIZE) if self.plus else None

    def _dims(self, area: int, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` of an image resized to ``area`` pixels, its aspect kept (the pipelines' rule)."""
        w, h = self.module.calculate_dimensions(area, width / height)[:2]
        return int(h), int(w)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.channels, height // self.scale, width // self.scale)

    # ---- encoders --------------------------------------------------------------------------------

    def _to_device(self, name: str) -> None:
        """Move the pipeline's ``text_encoder`` or ``vae`` back to the device (decoding during training
        needs the VAE only, 0.25 GB, not the 16 GB text encoder)."""
        if name not in self._on_device:
            getattr(self.pipe, name).to(self.device)
            self._on_device.add(name)

    def offload_encoders(self) -> None:
        import torch

        if self.device.type == "cpu" or not self._on_device:
            return
        for name in sorted(self._on_device):
            getattr(self.pipe, name).to("cpu")
        self._on_device.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _pil(self, image: torch.Tensor) -> Any:
        from clora.images import to_pil

        return to_pil(image)

    def _vae_input(self, pil: Any) -> torch.Tensor:
        """The pipeline's VAE input for a source image: resized to the VAE area, in [-1, 1]."""
        h, w = self._dims(self._vae_area(), pil.height, pil.width)
        if not self.plus:
            pil = self.pipe.image_processor.resize(pil, h, w)
        out: torch.Tensor = self.pipe.image_processor.preprocess(pil, h, w)
        return out

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents ``[B, z, h, w]`` of images ``[B,3,H,W]`` in [-1, 1]."""
        import torch

        self._to_device("vae")
        vae = self.pipe.vae
        with torch.no_grad():
            x = pixels.to(self.device, vae.dtype).unsqueeze(2)
            latents = self.pipe._encode_vae_image(x, generator=None)
        return latents[:, :, 0].to(self.dtype)

    def encode_sources(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        pixels = torch.cat([self._vae_input(self._pil(img)) for img in images])
        return self._vae_encode(pixels)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._vae_encode(images * 2 - 1)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        self._to_device("vae")
        vae = self.pipe.vae
        x = latents.unsqueeze(2).to(self.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, self.channels, 1, 1, 1).to(x)
        std = torch.tensor(vae.config.latents_std).view(1, self.channels, 1, 1, 1).to(x)
        with torch.no_grad():
            image = vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode_prompts(self, prompts: list[str], images: torch.Tensor | None = None) -> PromptEmbeds:
        import torch

        if images is None or len(images) != len(prompts):
            raise CloraError(f"base '{self.base_id}' encodes each prompt with its source image; none given")
        self._to_device("text_encoder")
        rows = []
        with torch.no_grad():
            for prompt, image in zip(prompts, images, strict=True):
                pil = self._pil(image)
                area = self._condition_area()
                if self.plus:
                    h, w = self._dims(area or self._vae_area(), pil.height, pil.width)
                    condition: Any = [self.pipe.image_processor.resize(pil, h, w)]
                else:
                    h, w = self._dims(area or self._vae_area(), pil.height, pil.width)
                    condition = self.pipe.image_processor.resize(pil, h, w)
                embeds, mask = self.pipe.encode_prompt(prompt=[prompt], image=condition, device=self.device)
                if mask is None:
                    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
                rows.append(PromptEmbeds(embeds.to(self.dtype), mask))
        return PromptEmbeds.cat(rows)

    # ---- the transformer -------------------------------------------------------------------------

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        packed: torch.Tensor = self.pipe._pack_latents(latents, b, c, h, w)
        return packed

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        unpacked: torch.Tensor = self.pipe._unpack_latents(tokens, h * self.scale, w * self.scale, self.scale)
        return unpacked[:, :, 0]

    def predict_velocity(
        self, noisy: torch.Tensor, sigma: torch.Tensor, source: torch.Tensor, prompts: PromptEmbeds
    ) -> torch.Tensor:
        import torch

        b, _, h, w = noisy.shape
        hs, ws = source.shape[-2:]
        tokens = self._pack(noisy)
        hidden = torch.cat([tokens, self._pack(source.to(noisy.dtype))], dim=1)
        # the pipeline passes its scheduler's timestep (sigma * 1000) in the latents' dtype, over 1000
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=noisy.device).expand(b)
        timestep = (sigma * 1000).to(noisy.dtype) / 1000
        mask = prompts.mask
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=prompts.embeds.to(noisy.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, h // 2, w // 2), (1, hs // 2, ws // 2)]] * b,
            return_dict=False,
        )[0]
        return self._unpack(out[:, : tokens.shape[1]], h, w)

    # ---- sampling --------------------------------------------------------------------------------

    def initial_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        # the pipeline draws its first latents as [B, 1, z, h, w] and packs them
        import torch

        b, c, h, w = shape
        return torch.randn((b, 1, c, h, w), generator=generator, dtype=torch.float32)[:, 0]

    def sampling_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        # the scheduler's stochastic step draws in the packed token layout
        import torch

        b, c, h, w = shape
        tokens = torch.randn((b, (h // 2) * (w // 2), c * 4), generator=generator, dtype=torch.float32)
        return self._unpack(tokens, h, w)

    def sampler_generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        # the pipeline draws its first latents from the generator it is given and the scheduler re-noises
        # from torch's global one: two generators with the seed reproduce it after torch.manual_seed(seed)
        import torch

        return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)

    @property
    def default_guidance(self) -> float:
        return 4.0  # the pipelines' true_cfg_scale

    def guidance_active(self, scale: float) -> bool:
        return scale > 1  # as the pipelines: true CFG only above 1

    def combine_guidance(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        import torch

        _, _, h, w = cond.shape
        c, u = self._pack(cond), self._pack(uncond)
        comb = u + scale * (c - u)
        comb = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return self._unpack(comb, h, w)

    def teacher_sigmas(self, steps: int, latent_shape: tuple[int, ...], shift: float = 3.0) -> torch.Tensor:
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        cfg = scheduler.config
        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        mu = self.module.calculate_shift(
            tokens,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        sigmas: torch.Tensor = scheduler.sigmas.float().cpu()
        return sigmas


KINDS = [
    QwenEditKind(
        "qwen-image-edit-plus",
        "QwenImageEditPlusPipeline",
        True,
        "Qwen-Image-Edit-2509 and later (QwenImageEditPlusPipeline) from a local diffusers folder",
    ),
    QwenEditKind(
        "qwen-image-edit",
        "QwenImageEditPipeline",
        False,
        "Qwen-Image-Edit (QwenImageEditPipeline) from a local diffusers folder",
    ),
]
