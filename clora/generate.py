"""Few-step editing with a unified LoRA: any member effect by its trigger, or several composed."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch

from clora.backbone import Backbone
from clora.errors import CloraError, UnknownEffectError
from clora.plugins import Components
from clora.sampling import few_step_sample, few_step_sigmas
from clora.unified import UnifiedHeader, read_header

ADAPTER = "unified"


def drop_adapters(transformer: Any, names: list[str]) -> None:
    """Delete those of ``names`` that are loaded on ``transformer`` (so a name can be loaded afresh)."""
    present = [n for n in names if n in getattr(transformer, "peft_config", {})]
    if present:
        transformer.delete_adapters(present)


def fused_adapters(transformer: Any) -> set[str]:
    """The adapters merged into ``transformer``'s base weights (diffusers ``fuse_lora``), if any."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: set[str] = set()
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            out.update(module.merged_adapters)
    return out


def unfuse(transformer: Any) -> None:
    """Restore the base weights if an adapter is fused into them; call before running any other adapter
    (a merged layer ignores which adapter is active)."""
    if fused_adapters(transformer):
        transformer.unfuse_lora()


class UnifiedModel:
    """The base model with one unified LoRA loaded (through diffusers' ``load_lora_adapter``).

    With ``fuse`` (the default) ``edit`` merges the LoRA into the base weights the first time it runs:
    one LoRA serves every effect, so it never has to be swapped out, and a fused layer costs what the
    base layer costs (about a quarter less time per image on the toy base). Functions here that run
    another adapter on the same transformer unfuse first."""

    def __init__(self, backbone: Backbone, file: Path, header: UnifiedHeader, fuse: bool = True) -> None:
        self.backbone, self.file, self.header, self.fuse = backbone, file, header, fuse

    @classmethod
    def load(
        cls,
        components: Components,
        file: str | os.PathLike[str],
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        backbone: Backbone | None = None,
        fuse: bool = True,
    ) -> UnifiedModel:
        """Load the base named in ``file``'s header (or use ``backbone``) and attach the unified LoRA
        (``fuse``: merge it into the base weights when editing; see the class)."""
        path = Path(file)
        header = read_header(path)
        if backbone is None:
            backbone = components.get_backbone(header.base_id).load(device, dtype)
        if backbone.fingerprint != header.base_fingerprint:
            raise CloraError(
                f"{path} was distilled on other weights of base '{header.base_id}' than the ones installed; "
                "distill again on this base"
            )
        tr = backbone.transformer
        unfuse(tr)
        drop_adapters(tr, [ADAPTER])
        tr.load_lora_adapter(str(path), prefix="transformer", adapter_name=ADAPTER, use_safetensors=True)
        tr.requires_grad_(False)
        return cls(backbone, path, header, fuse)

    def activate(self) -> None:
        """Make the unified LoRA the one that runs: fused into the base weights, or as an adapter."""
        tr = self.backbone.transformer
        if self.fuse and fused_adapters(tr) == {ADAPTER}:
            return
        unfuse(tr)
        tr.enable_adapters()
        tr.set_adapter(ADAPTER)
        if self.fuse:
            tr.fuse_lora(adapter_names=[ADAPTER])

    @property
    def effects(self) -> list[str]:
        return sorted(self.header.effects)

    def check_effect(self, name: str) -> None:
        if name not in self.header.effects:
            close = difflib.get_close_matches(name, self.effects, n=3)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise UnknownEffectError(
                f"effect '{name}' is not in {self.file.name}; {hint}it has: "
                f"{', '.join(self.effects) or 'no effects'}"
            )

    def prompt(self, effects: list[str], extra: str | None = None) -> str:
        """The student prompt: each effect's trained prompt (``<trigger> <caption>``), composed in
        order, plus ``extra``."""
        for name in effects:
            self.check_effect(name)
        parts = [self.effect_prompt(n) for n in effects]
        text = self.backbone.compose_prompt(parts) if parts else ""
        if extra:
            text = f"{text}, {extra}" if text else extra
        return text

    def effect_prompt(self, name: str) -> str:
        """The text the student learned ``name`` under; files written before the header recorded it
        get trigger + caption, what a default run trains."""
        fields = self.header.effects[name]
        return fields.get("prompt") or f"{fields['trigger']} {fields['caption']}".strip()

    def sigmas(self, steps: int | None) -> torch.Tensor:
        if steps is None or steps == len(self.header.few_step_sigmas):
            return torch.tensor(self.header.few_step_sigmas)
        return few_step_sigmas(steps, self.header.shift)

    @torch.no_grad()
    def edit(
        self,
        images: torch.Tensor,
        effects: list[str],
        prompt: str | None = None,
        steps: int | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Edit ``images [B,3,H,W]`` in [0,1] with ``effects`` (composed in order); images in [0,1] out."""
        bb = self.backbone
        self.activate()
        text = self.prompt(effects, prompt)
        source = bb.encode_images(images)
        g = torch.Generator().manual_seed(seed)
        out = few_step_sample(bb, source, [text] * len(images), self.sigmas(steps).to(bb.device, bb.dtype), g)
        return bb.decode_latents(out)


@torch.no_grad()
def full_edit(
    backbone: Backbone,
    adapter: str,
    prompt: str,
    images: torch.Tensor,
    steps: int = 20,
    guidance: float = 4.0,
    shift: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """The base with the loaded adapter ``adapter`` and ``prompt``: full Euler sampler with CFG."""
    from clora.sampling import euler_sample

    tr = backbone.transformer
    unfuse(tr)
    tr.enable_adapters()
    tr.set_adapter(adapter)
    g = torch.Generator().manual_seed(seed)
    source = backbone.encode_images(images)
    out = euler_sample(
        backbone, source, [prompt] * len(images), steps=steps, guidance=guidance, generator=g, shift=shift
    )
    return backbone.decode_latents(out)


@torch.no_grad()
def teacher_edit(
    backbone: Backbone,
    components: Components,
    lora_path: str,
    teacher_prompt: str,
    images: torch.Tensor,
    steps: int = 20,
    guidance: float = 4.0,
    shift: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """The old way: base + the effect's own LoRA, full Euler sampler with CFG."""
    from clora.lora import add_lora_adapter, linear_shapes, read_lora

    tr = backbone.transformer
    unfuse(tr)
    lora = read_lora(lora_path, components.teacher_providers(), module_names=linear_shapes(tr))
    name = "teacher_edit"
    drop_adapters(tr, [name])
    add_lora_adapter(tr, lora.modules, name)
    try:
        return full_edit(backbone, name, teacher_prompt, images, steps, guidance, shift, seed)
    finally:
        tr.delete_adapters([name])


@torch.no_grad()
def cascade_edit(
    backbone: Backbone,
    components: Components,
    lora_path: str,
    teacher_prompt: str,
    accel_file: str | os.PathLike[str],
    images: torch.Tensor,
    steps: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The paper's baseline: the effect LoRA stacked with an acceleration LoRA, sampled in few steps."""
    from clora.lora import add_lora_adapter, linear_shapes, read_lora

    header = read_header(accel_file)
    tr = backbone.transformer
    unfuse(tr)
    lora = read_lora(lora_path, components.teacher_providers(), module_names=linear_shapes(tr))
    drop_adapters(tr, ["cascade_effect", "cascade_accel"])
    add_lora_adapter(tr, lora.modules, "cascade_effect")
    tr.load_lora_adapter(
        str(accel_file), prefix="transformer", adapter_name="cascade_accel", use_safetensors=True
    )
    try:
        tr.enable_adapters()
        tr.set_adapters(["cascade_effect", "cascade_accel"], [1.0, 1.0])
        sigmas = (
            torch.tensor(header.few_step_sigmas)
            if steps is None or steps == len(header.few_step_sigmas)
            else few_step_sigmas(steps, header.shift)
        )
        g = torch.Generator().manual_seed(seed)
        source = backbone.encode_images(images)
        out = few_step_sample(
            backbone, source, [teacher_prompt] * len(images), sigmas.to(backbone.device, backbone.dtype), g
        )
        return backbone.decode_latents(out)
    finally:
        tr.delete_adapters(["cascade_effect", "cascade_accel"])
