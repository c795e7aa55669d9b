"""LoRA file formats of Qwen-Image(-Edit) LoRAs: diffusers, peft, ComfyUI and kohya-style files.

Registered through ``register_teacher_providers`` like any third-party format would be. Every layout
is renamed to diffusers' module names by diffusers' own converter for Qwen-Image LoRAs,
``_convert_non_diffusers_qwen_lora_to_diffusers`` (what ``QwenImageLoraLoaderMixin.lora_state_dict``
runs); only the prefixes it does not know are rewritten here first, each marked where it happens.

That converter folds ``.alpha`` into the weights (``down *= s1``, ``up *= s2`` with ``s1 * s2 = alpha /
rank``). clora keeps the file's weights and its alpha instead: :class:`~clora.lora.LoraModule` applies the
same ``alpha / rank`` scale, and the registry shows the alpha the file was trained with.

Whatever a LoRA holds that clora cannot apply (DoRA, LoKr/LoHa, full-weight or bias deltas, LoRA biases,
text-encoder LoRAs, tensors nobody reads) is refused with one line naming it, never dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clora import hookimpl
from clora.errors import LoraFileError
from clora.lora import LoraModule

if TYPE_CHECKING:
    import torch

#: header entry that carries a peft folder's ``adapter_config.json`` (see :meth:`PeftFormat.locate`)
ADAPTER_CONFIG_KEY = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"

# key ending -> role; ".default" is peft's adapter name left in by `model.state_dict()`
_ROLES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "lora_te")
_ADAPTER_KEY = re.compile(
    r"lora_[AB]\b|lora_(down|up)\b|lora_magnitude_vector|dora_scale|lokr_|hada_|\.alpha$|\.diff(_b)?$"
)

# (what it is, pattern over keys, why not and what to do); checked in this order, first hit is reported
_REFUSED: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        "text-encoder LoRA weights",
        re.compile(r"^(lora_te\d*_|text_encoder(_\d)?\.)"),
        "only the image transformer is adapted; save the LoRA without its text-encoder part",
    ),
    (
        "DoRA magnitudes",
        re.compile(r"lora_magnitude_vector|dora_scale"),
        "only plain LoRAs can be distilled; train or extract the effect as a LoRA without DoRA",
    ),
    (
        "LyCORIS LoKr/LoHa/OFT weights",
        re.compile(r"\.(lokr_|hada_|oft_|boft_)|\.lora_mid\."),
        "only plain LoRAs (lora_A/lora_B or lora_down/lora_up) can be distilled; train or extract one",
    ),
    (
        "full-weight or bias deltas (.diff/.diff_b)",
        re.compile(r"\.diff(_b)?$"),
        "a LoRA cannot express them; save the LoRA without them",
    ),
    (
        "LoRA biases",
        re.compile(r"\.lora_(A|B|down|up)(\.default)?\.bias$"),
        "its adapters have no bias; train the LoRA without lora_bias",
    ),
)


def _some(keys: list[str]) -> str:
    """Up to 3 keys and a count of the rest, for one-line messages."""
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(f"'{k}'" for k in keys[:3]) + more


def _layout(keys: Collection[str]) -> str | None:
    """Which built-in format a file's key names are in; exactly one of them, or None."""
    if any(k.startswith(_KOHYA_PREFIXES) or ".lora_down." in k or ".lora_up." in k for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith(("transformer.", "text_encoder")) for k in keys):
        return "diffusers"
    if any(_ADAPTER_KEY.search(k) for k in keys):
        return "peft"
    return None


def _refuse_unsupported(keys: Collection[str]) -> None:
    for what, pattern, advice in _REFUSED:
        hits = sorted(k for k in keys if pattern.search(k))
        if hits:
            raise LoraFileError(f"holds {what} ({_some(hits)}), which clora cannot apply: {advice}")


def _header_config(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The transformer's LoraConfig kwargs from diffusers' ``lora_adapter_metadata`` header, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFileError(
            "has a 'lora_adapter_metadata' header that is not JSON; re-save it with diffusers"
        ) from None
    if not isinstance(cfg, dict):
        return None
    # diffusers' pipelines prefix each key with the component (`transformer.r`); its models do not
    if any(k.startswith("transformer.") for k in cfg):
        return {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    return {k: v for k, v in cfg.items() if "." not in k}


def _sidecar_config(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(ADAPTER_CONFIG_KEY)
    if raw is None:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFileError(f"has an {ADAPTER_CONFIG_KEY} beside it that is not JSON") from None
    if not isinstance(cfg, dict):
        raise LoraFileError(f"has an {ADAPTER_CONFIG_KEY} beside it that is not a JSON object")
    return cfg


def _check_config(cfg: Mapping[str, Any], source: str) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise LoraFileError(
            f"is a peft {peft_type} adapter (says {source}), which clora cannot apply: "
            "only plain LoRAs can be distilled; train or extract a LoRA"
        )
    if cfg.get("use_dora"):
        raise LoraFileError(
            f"is a DoRA ({source} sets use_dora), which clora cannot apply: "
            "only plain LoRAs can be distilled; train or extract the effect as a LoRA without DoRA"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise LoraFileError(f"has {source} whose {key} is not a JSON object; re-save it with peft")
    if cfg.get("lora_bias"):
        raise LoraFileError(
            f"has LoRA biases ({source} sets lora_bias), which clora cannot apply: "
            "its adapters have no bias; train the LoRA without lora_bias"
        )


def _config_alpha(name: str, rank: int, cfg: Mapping[str, Any], source: str) -> float:
    """Module ``name``'s alpha under a peft LoraConfig, as peft itself resolves it; rsLoRA's
    ``alpha / sqrt(r)`` scale is returned as the alpha that gives it under ``alpha / r``."""
    from dataclasses import fields

    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    defaults = {f.name: f.default for f in fields(LoraConfig)}
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    try:
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), name), cfg.get("r", defaults["r"]))
        alpha = alpha_pattern.get(
            get_pattern_key(list(alpha_pattern), name), cfg.get("lora_alpha", defaults["lora_alpha"])
        )
    except re.error as e:
        raise LoraFileError(f"has {source} with a rank/alpha pattern that is not a regex ({e})") from None
    if int(r) != rank:
        raise LoraFileError(
            f"has {source} giving module '{name}' rank {r} but its weights have rank {rank}; "
            "that config does not belong to these weights"
        )
    if cfg.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


def _qwen_name(
    stem: str, down_suffix: str, up_suffix: str, down: torch.Tensor, up: torch.Tensor
) -> str | None:
    """The diffusers module name diffusers' Qwen-Image converter gives ``stem``, or None if it cannot."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    # One module at a time, without `.alpha` and with empty views of the weights: only the name is
    # taken, so nothing is folded or copied here.
    try:
        converted = _convert_non_diffusers_qwen_lora_to_diffusers(
            {stem + down_suffix: down[:0], stem + up_suffix: up[:0]}
        )
    except (ValueError, KeyError, IndexError):
        return None
    names = [k for k in converted if k.endswith(".lora_A.weight")]
    if len(names) != 1:
        return None
    name = names[0].removeprefix("transformer.").removesuffix(".lora_A.weight")
    # The converter re-dots kohya's flat names assuming Qwen-Image's; names of other models (FLUX's
    # `double_blocks_0_img_attn_qkv`) come back mangled, which re-flattening the answer reveals.
    if stem.startswith("lora_unet_") and name.replace(".", "_") != stem.removeprefix("lora_unet_"):
        return None
    return name


def parse_lora(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    rename: Callable[[str], str] = lambda stem: stem,
    peft: bool = False,
) -> dict[str, LoraModule]:
    """Modules of a LoRA state dict keyed by diffusers module name; raises for anything it cannot honour.

    ``rename`` rewrites a module's key stem into a spelling diffusers' converter takes. ``peft`` marks
    peft's files: an ``adapter_config.json`` found beside the file gives the alphas, and weights under
    peft's ``base_model.model.`` need one (peft's own default alpha is not the rank).
    """
    _refuse_unsupported(tensors.keys())
    stems: dict[str, dict[str, str]] = {}
    leftovers = []
    for key in tensors:
        for suffix, role in _ROLES.items():
            if key.endswith(suffix):
                stems.setdefault(key[: -len(suffix)], {})[role] = key
                break
        else:
            leftovers.append(key)
    pairs = {stem: roles for stem, roles in stems.items() if "down" in roles and "up" in roles}
    if not pairs:
        return {}
    leftovers += [key for stem, roles in stems.items() if stem not in pairs for key in roles.values()]
    if leftovers:
        raise LoraFileError(
            f"holds {len(leftovers)} {'tensor' if len(leftovers) == 1 else 'tensors'} clora cannot use as "
            f"LoRA weights ({_some(sorted(leftovers))}); remove {'it' if len(leftovers) == 1 else 'them'} or "
            "convert the file to a plain LoRA"
        )

    cfg, source = None, ""
    if peft and (cfg := _sidecar_config(metadata)) is not None:
        source = f"the {ADAPTER_CONFIG_KEY} beside it"
    elif (cfg := _header_config(metadata)) is not None:
        source = "its lora_adapter_metadata header"
    if cfg is not None:
        _check_config(cfg, source)
    wrapped = [r["down"] for s, r in pairs.items() if s.startswith("base_model.model.") and "alpha" not in r]
    if peft and cfg is None and wrapped:
        raise LoraFileError(
            f"holds peft weights ('{wrapped[0]}') but no {ADAPTER_CONFIG_KEY} beside them gives their "
            f"lora_alpha; put the {ADAPTER_CONFIG_KEY} saved with them next to the weights file"
        )

    modules: dict[str, LoraModule] = {}
    seen: dict[str, str] = {}
    for stem, roles in pairs.items():
        down, up = tensors[roles["down"]], tensors[roles["up"]]
        if down.ndim != 2 or up.ndim != 2:
            raise LoraFileError(
                f"holds {down.ndim}-D LoRA weights for '{stem}' (a convolution LoRA?), which clora "
                "cannot apply: Qwen-Image LoRAs adapt Linear layers only"
            )
        rank = int(down.shape[0])
        if up.shape[1] != rank:
            raise LoraFileError(
                f"holds module '{stem}' with lora_down of rank {rank} but lora_up of rank {up.shape[1]}"
            )
        new_stem = rename(stem)
        converted = _qwen_name(new_stem, roles["down"][len(stem) :], roles["up"][len(stem) :], down, up)
        # a name diffusers cannot convert is kept as written, so check_fits names it against the base
        name = converted if converted is not None else stem
        if name in seen:
            raise LoraFileError(f"holds module '{name}' twice ('{seen[name]}' and '{stem}')")
        seen[name] = stem
        if "alpha" in roles:
            alpha_tensor = tensors[roles["alpha"]]
            if alpha_tensor.numel() != 1:
                raise LoraFileError(
                    f"holds '{roles['alpha']}' with {alpha_tensor.numel()} values; alpha is one"
                )
            alpha = float(alpha_tensor.float().item())
        elif cfg is not None:
            alpha = _config_alpha(name, rank, cfg, source)
        else:
            alpha = float(rank)  # diffusers' convention when a file says nothing: scale 1
        modules[name] = LoraModule(down=down, up=up, alpha=alpha)
    return modules


class DiffusersFormat:
    """diffusers ``save_lora_weights`` / ``save_lora_adapter`` files, or their folder.

    Takes ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_A.default.weight`` and
    ``transformer.<module>.alpha`` too), and a folder holding ``pytorch_lora_weights.safetensors``. Alphas
    come from ``.alpha`` tensors, else from the ``lora_adapter_metadata`` header (``r``, ``lora_alpha``,
    ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, with peft's pattern matching), else alpha = rank.
    """

    format_id = "diffusers"

    def sniff(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        return _layout(keys) == self.format_id

    def parse(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        module_names: Collection[str] | None,
    ) -> dict[str, LoraModule]:
        # diffusers strips its own `transformer.` in load_lora_adapter(prefix=...), not in a converter
        return parse_lora(tensors, metadata, lambda stem: stem.removeprefix("transformer."))

    def locate(self, path: Path) -> tuple[Path, dict[str, str]] | None:
        weights = path / DIFFUSERS_WEIGHTS
        return (weights, {}) if path.is_dir() and weights.is_file() else None


class PeftFormat:
    """peft ``save_pretrained`` adapters, and LoRA keys with no prefix at all.

    Takes ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (also with peft's ``.default``
    adapter name) from an adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) or
    its weights file with the config beside it; ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``
    (regexes matched against module names as peft does) and ``use_rslora`` are honoured. Unprefixed
    ``<module>.lora_A.weight`` keys (diffusers-named modules saved without ``transformer.``) are read
    the same way; with no config anywhere their alpha is their rank, diffusers' convention.
    """

    format_id = "peft"

    def sniff(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        return _layout(keys) == self.format_id

    def parse(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        module_names: Collection[str] | None,
    ) -> dict[str, LoraModule]:
        # peft's PeftModel wrapper prefix; diffusers has no converter for peft's own files
        return parse_lora(tensors, metadata, lambda stem: stem.removeprefix("base_model.model."), peft=True)

    def locate(self, path: Path) -> tuple[Path, dict[str, str]] | None:
        weights = path / PEFT_WEIGHTS if path.is_dir() else path
        if not weights.is_file():
            return None
        config = weights.parent / ADAPTER_CONFIG_KEY
        if not config.is_file():
            return (weights, {}) if path.is_dir() else None
        try:
            return weights, {ADAPTER_CONFIG_KEY: config.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as e:
            raise LoraFileError(
                f"cannot read {config} ({e}); it must be peft's JSON adapter config"
            ) from None


class ComfyFormat:
    """ComfyUI's own Qwen-Image LoRA layout, as ai-toolkit and musubi-tuner's converter write it.

    Takes ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` with optional
    ``diffusion_model.<module>.alpha``; renamed by diffusers' Qwen-Image converter.
    """

    format_id = "comfyui"

    def sniff(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        return _layout(keys) == self.format_id

    def parse(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        module_names: Collection[str] | None,
    ) -> dict[str, LoraModule]:
        return parse_lora(tensors, metadata)


def _kohya_stem(stem: str) -> str:
    # Prefixes diffusers' converter does not take, rewritten to ones it does: ai-toolkit's non-peft
    # `lora_transformer_` and SimpleTuner's `lycoris_` are kohya's flat names under another prefix, and
    # `transformer.` would come back doubled (`transformer.transformer.`).
    for prefix in ("lora_transformer_", "lycoris_"):
        if stem.startswith(prefix):
            return "lora_unet_" + stem[len(prefix) :]
    return stem.removeprefix("transformer.")


class KohyaFormat:
    """kohya-ss / musubi-tuner files and every other ``lora_down`` / ``lora_up`` spelling.

    Takes ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
    (musubi-tuner's Qwen-Image LoRAs), the same under ``lora_transformer_`` or ``lycoris_``, and dotted
    names with ``lora_down`` / ``lora_up`` under ``diffusion_model.``, ``transformer.`` or no prefix;
    renamed by diffusers' Qwen-Image converter. A module without ``.alpha`` has alpha = rank.
    """

    format_id = "kohya"

    def sniff(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        return _layout(keys) == self.format_id

    def parse(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        module_names: Collection[str] | None,
    ) -> dict[str, LoraModule]:
        return parse_lora(tensors, metadata, _kohya_stem)


@hookimpl
def register_teacher_providers(register: Any) -> None:
    register(DiffusersFormat())
    register(PeftFormat())
    register(ComfyFormat())
    register(KohyaFormat())
