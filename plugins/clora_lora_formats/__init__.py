"""LoRA file formats: peft, diffusers and kohya/ComfyUI safetensors files.

Registered through ``register_teacher_providers`` like any third-party format would be.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from clora import hookimpl
from clora.lora import LoraModule, header_alpha

if TYPE_CHECKING:
    import torch

_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")


def _pairs(
    tensors: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], down: str, up: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    out = {}
    for key, value in tensors.items():
        if not key.endswith(down):
            continue
        stem = key[: -len(down)]
        if stem + up not in tensors:
            continue
        name = stem
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        out[name] = (value, tensors[stem + up], tensors.get(stem + ".alpha"))
    return out


def _modules(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], metadata: Mapping[str, str]
) -> dict[str, LoraModule]:
    default_alpha = header_alpha(metadata)
    modules = {}
    for name, (down, up, alpha) in pairs.items():
        if down.ndim != 2 or up.ndim != 2:
            continue  # conv LoRAs are not used by transformer backbones
        rank = down.shape[0]
        a = float(alpha.item()) if alpha is not None else (default_alpha or float(rank))
        modules[name] = LoraModule(down=down, up=up, alpha=a)
    return modules


class PeftFormat:
    """peft ``save_pretrained`` files: ``base_model.model.<module>.lora_A.weight`` (or no prefix)."""

    format_id = "peft"
    prefixes: tuple[str, ...] = ("base_model.model.",)

    def sniff(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        lora = [k for k in keys if k.endswith(_PEFT_SUFFIXES)]
        return bool(lora) and not any(k.startswith(("transformer.", "diffusion_model.")) for k in lora)

    def parse(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        module_names: Collection[str] | None,
    ) -> dict[str, LoraModule]:
        return _modules(_pairs(tensors, self.prefixes, *_PEFT_SUFFIXES), metadata)


class DiffusersFormat(PeftFormat):
    """diffusers ``save_lora_weights`` files: ``transformer.<module>.lora_A.weight``."""

    format_id = "diffusers"
    prefixes = ("transformer.", "diffusion_model.")

    def sniff(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        return any(k.endswith(_PEFT_SUFFIXES) and k.startswith(self.prefixes) for k in keys)


class KohyaFormat:
    """kohya-ss / ComfyUI files: ``lora_unet_<module_with_underscores>.lora_down.weight`` + ``.alpha``."""

    format_id = "kohya"
    prefixes = ("lora_unet_", "lora_transformer_", "diffusion_model.", "transformer.")

    def sniff(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        return any(k.endswith(_KOHYA_SUFFIXES) for k in keys)

    def parse(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        module_names: Collection[str] | None,
    ) -> dict[str, LoraModule]:
        modules = _modules(_pairs(tensors, self.prefixes, *_KOHYA_SUFFIXES), metadata)
        if not module_names:
            return modules
        # kohya flattens dots to underscores; the base's own module names undo that.
        by_flat = {n.replace(".", "_"): n for n in module_names}
        return {
            by_flat.get(name, by_flat.get(name.replace(".", "_"), name)): m for name, m in modules.items()
        }


@hookimpl
def register_teacher_providers(register: Any) -> None:
    register(DiffusersFormat())
    register(PeftFormat())
    register(KohyaFormat())
