"""Reading LoRA files in any registered format, checking them against a base, loading them as adapters.

A format is a :class:`TeacherProvider` registered by a plugin (``register_teacher_providers``). Each
provider turns a file's tensors into :class:`LoraModule` objects keyed by the base module name, so
the rest of clora sees one shape whatever wrote the file.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from clora.errors import CloraError, IncompatibleLoraError, LoraFileError
from clora.fileio import sha256_file

if TYPE_CHECKING:
    import torch

# clora keeps several adapters on one base on purpose (student, critic, teachers); peft warns about
# exactly that on every add and delete. Only these two messages are silenced, for everyone importing clora.
warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute", category=UserWarning)
warnings.filterwarnings(
    "ignore", message=r"Adapter \S+ was active which is now deleted", category=UserWarning
)


@dataclass
class LoraModule:
    """One adapted Linear: ``delta W = (alpha / rank) * up @ down``."""

    down: torch.Tensor  # [rank, in_features]  (peft lora_A)
    up: torch.Tensor  # [out_features, rank]  (peft lora_B)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class TeacherProvider(Protocol):
    """What a LoRA-format plugin registers.

    A provider may also define ``locate(path) -> tuple[Path, dict[str, str]] | None`` for formats kept
    as a folder or as weights plus companion files (peft's ``adapter_config.json``): given the path the
    user passed, the weights file to read and extra header entries made from the companions, or None if
    the format does not keep LoRAs that way. :func:`read_lora` asks every provider that has one.
    """

    #: format name stored on the effect (``peft``, ``diffusers``, ``kohya``, ...)
    format_id: str

    def sniff(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        """True if a file with these tensor names and header is in this format."""
        ...

    def parse(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        module_names: Collection[str] | None,
    ) -> dict[str, LoraModule]:
        """Modules keyed by base module name (``module_names`` resolves ambiguous spellings).

        Raises :class:`~clora.errors.LoraFileError` for tensors it cannot honour rather than dropping
        them; the message is one line, read after the file's path.
        """
        ...


@dataclass
class LoraFile:
    """A LoRA file read and parsed, with the facts the registry stores."""

    path: Path
    format_id: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    sha256: str
    size: int
    dtype: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def alpha(self) -> float:
        return max(m.alpha for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.modules)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, with one-line errors for bad files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise LoraFileError(f"LoRA file not found: {p}")
    if not p.is_file():
        raise LoraFileError(f"LoRA path is not a file: {p}")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoraFileError(
            f"{p} is not a readable safetensors file ({reason}); LoRA files must be .safetensors"
        ) from None
    return tensors, metadata


def read_lora(
    path: str | os.PathLike[str],
    providers: Iterable[TeacherProvider],
    module_names: Collection[str] | None = None,
) -> LoraFile:
    """Read and parse a LoRA file (or a folder a provider can ``locate``) with the first provider that
    recognises it."""
    providers = list(providers)
    weights, extra = _locate(Path(path), providers)
    tensors, metadata = read_safetensors(weights)
    if not tensors:
        raise LoraFileError(f"{path} holds no tensors; expected LoRA weights")
    _check_finite(path, tensors)
    metadata = {**metadata, **extra}
    keys = list(tensors)
    for provider in providers:
        if provider.sniff(keys, metadata):
            try:
                modules = provider.parse(tensors, metadata, module_names)
            except CloraError as e:
                raise type(e)(f"{path}: {e}") from None
            if not modules:
                break
            first = next(iter(modules.values()))
            return LoraFile(
                path=weights.resolve(),
                format_id=provider.format_id,
                modules=modules,
                metadata=metadata,
                sha256=sha256_file(weights),
                size=weights.stat().st_size,
                dtype=str(first.down.dtype).removeprefix("torch."),
            )
    known = ", ".join(sorted(p.format_id for p in providers)) or "none installed"
    raise LoraFileError(
        f"{path} holds no LoRA tensors in a known format (known: {known}); "
        "expected keys like '<module>.lora_A.weight' or '<module>.lora_down.weight'"
    )


def _check_finite(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """A LoRA holding NaN or infinite values is broken: refused, naming the first such tensor."""
    import torch

    bad = [
        k for k, t in sorted(tensors.items()) if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        t = tensors[bad[0]]
        n = int((~torch.isfinite(t)).sum())
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise LoraFileError(
            f"{path}: tensor '{bad[0]}' holds NaN or infinite values ({n} of {t.numel()}){more}; the LoRA "
            "is broken: retrain or re-export it"
        )


def _locate(path: Path, providers: Iterable[TeacherProvider]) -> tuple[Path, dict[str, str]]:
    """The weights file behind ``path`` and the header entries its format keeps beside it."""
    for provider in providers:
        locate = getattr(provider, "locate", None)
        found = locate(path) if locate is not None else None
        if found is not None:
            return found[0], dict(found[1])
    if path.is_dir():
        raise LoraFileError(
            f"{path} is a folder without a LoRA weights file any installed format knows "
            "(like peft's adapter_model.safetensors); pass the .safetensors file itself"
        )
    return path, {}


def check_fits(
    modules: Mapping[str, LoraModule], shapes: Mapping[str, tuple[int, int]], base_id: str
) -> None:
    """Raise if a LoRA targets modules the base lacks or has the wrong shapes for them."""
    missing = [m for m in modules if m not in shapes]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise IncompatibleLoraError(
            f"LoRA targets modules that base '{base_id}' does not have: "
            f"{', '.join(sorted(missing)[:3])}{more}; was it trained for another base model?"
        )
    for name, mod in modules.items():
        fan_in, fan_out = shapes[name]
        if mod.down.shape[1] != fan_in or mod.up.shape[0] != fan_out or mod.up.shape[1] != mod.rank:
            raise IncompatibleLoraError(
                f"LoRA module '{name}' has shape {tuple(mod.up.shape)}x{tuple(mod.down.shape)} but base "
                f"'{base_id}' needs in={fan_in}, out={fan_out}; was it trained for another base model?"
            )


def linear_shapes(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of every Linear of the base ``module``, seen through peft's LoRA wrappers."""
    import torch

    out = {}
    for name, m in module.named_modules():
        base = getattr(m, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            out[name] = (base.in_features, base.out_features)
        elif isinstance(m, torch.nn.Linear) and ".lora_" not in name and not name.endswith("base_layer"):
            out[name] = (m.in_features, m.out_features)
    return out


def add_lora_adapter(
    transformer: Any, modules: Mapping[str, LoraModule], adapter_name: str, trainable: bool = False
) -> None:
    """Attach ``modules`` to ``transformer`` as the peft adapter ``adapter_name`` (alpha honoured)."""
    import torch
    from peft import LoraConfig, set_peft_model_state_dict

    ranks = {name: m.rank for name, m in modules.items()}
    rank = max(ranks.values())
    # Fold each module's alpha/rank scale into `up`, so one config (alpha == rank -> scale 1) fits all.
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(modules),
        rank_pattern={re.escape(k): r for k, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(k): r for k, r in ranks.items() if r != rank},
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    ref = next(transformer.parameters())
    state = {}
    for name, m in modules.items():
        state[f"{name}.lora_A.weight"] = m.down.to(ref.device, torch.float32).to(ref.dtype)
        state[f"{name}.lora_B.weight"] = (m.up.to(ref.device, torch.float32) * m.scale).to(ref.dtype)
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise IncompatibleLoraError(f"LoRA keys did not load into the base: {unexpected[:3]}")
    if not trainable:
        for n, p in transformer.named_parameters():
            if f".{adapter_name}." in n:
                p.requires_grad_(False)


def attach_teacher(
    transformer: Any,
    providers: Iterable[TeacherProvider],
    lora_path: str | os.PathLike[str],
    adapter_name: str,
) -> LoraFile:
    """Read an effect's LoRA file in any registered format and attach it to ``transformer`` as the frozen
    adapter ``adapter_name``: the one way every command (distill, generate --teacher, eval and its
    baselines) loads a teacher."""
    lora = read_lora(lora_path, providers, module_names=linear_shapes(transformer))
    add_lora_adapter(transformer, lora.modules, adapter_name)
    return lora
