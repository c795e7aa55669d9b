"""Student, critic and teachers as peft adapters on one frozen base transformer.

peft's ``set_adapter`` flips ``requires_grad`` on every adapter and ``disable_adapters`` turns it off
everywhere, so after each switch we set it back explicitly on the two trainable adapters.

An on-policy step switches adapters about twenty times (student, each group's teacher, critic). A
switch walks the adapter layers once (:meth:`AdapterSet.use`), and one to the adapter already active
costs nothing; diffusers' model-level ``enable_adapters`` + ``set_adapter`` walked every module twice
(about four times the cost on the toy base). peft's mixed-batch inference (every group's teacher in
one pass) was measured slower on CPU than a pass per group, as it gathers and scatters each adapter's
rows at every layer, so the teachers still run group by group.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from clora.errors import CloraError
from clora.lora import attach_teacher

if TYPE_CHECKING:
    from clora.backbone import Backbone
    from clora.plugins import Components

STUDENT = "student"
CRITIC = "critic"
#: the fixed components of a student that grows (its parent collection's), a separate adapter that is
#: active with the student; no name containing it or contained in it may be another adapter's (peft
#: finds an adapter's weights by a substring match of its name)
PARENT = "parent"
#: ``AdapterSet.active`` while the active adapter is not known (after an adapter was added or deleted)
UNKNOWN = "\0unknown"


class AdapterSet:
    """Switches which adapter the base runs with; loads teacher LoRAs on demand (LRU-bounded).

    The student (and, when the run has an on-policy phase, the critic) are trainable float32 adapters.
    A student that grows (``frozen_rank``: its parent's rank) is two adapters, always active together:
    the parent's components, fixed (``PARENT``), and ``rank - frozen_rank`` new ones that train, both at
    the student's alpha/rank; :meth:`state_dict` and :meth:`load_state_dict` see them as one rank-``rank``
    LoRA, parent components first. The fixed ones then cost no gradients and no optimizer state."""

    def __init__(
        self,
        backbone: Backbone,
        rank: int,
        alpha: float,
        target_modules: list[str],
        max_teachers: int,
        components: Components,
        with_critic: bool = True,
        frozen_rank: int = 0,
    ):
        self.backbone = backbone
        self.transformer: Any = backbone.transformer
        self.components = components
        self.max_teachers = max_teachers
        self.config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules))  # type: ignore[arg-type]
        self.transformer.requires_grad_(False)
        # a run that only anchors never uses a critic: it gets no adapter
        self.trained: tuple[str, ...] = ()
        self.params: dict[str, list[torch.nn.Parameter]] = {}
        self.frozen_rank = frozen_rank
        self._fixed: list[torch.nn.Parameter] = []
        if frozen_rank:
            self._fixed = self._add(PARENT, self._config(frozen_rank))
        for name in (STUDENT, CRITIC) if with_critic else (STUDENT,):
            self.add_trained(name)
        self._teachers: OrderedDict[str, str] = OrderedDict()  # lora path -> adapter name
        #: lora path -> the sha256 the run's plan recorded; a teacher file changed since is refused
        self.expected_sha256: dict[str, str] = {}
        self.teacher_loads = 0
        #: the adapter the base runs with (None: none); UNKNOWN makes the next :meth:`use` switch
        self.active: str | None = UNKNOWN
        self._tuner_layers: list[Any] | None = None  # found again after an adapter is added
        self._train_flags()

    def add_trained(self, name: str) -> None:
        """Add a trainable adapter ``name`` (the critic of a run that only anchors but has on-policy
        effects is added once the effects are known). The trained LoRAs (and so their optimizer state)
        stay float32 over a bfloat16 base; peft casts each layer's input to its LoRA's dtype and the sum
        back to the base's."""
        config = self._config(self.config.r - self.frozen_rank) if name == STUDENT else self.config
        self.params[name] = self._add(name, config)
        self.trained = (*self.trained, name)
        self._train_flags()

    def _config(self, rank: int) -> LoraConfig:
        """The student's LoRA config with ``rank`` of its components (the same alpha/rank)."""
        scale = self.config.lora_alpha / self.config.r
        return LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=self.config.target_modules)  # type: ignore[arg-type]

    def _add(self, name: str, config: LoraConfig) -> list[torch.nn.Parameter]:
        self.transformer.add_adapter(config, adapter_name=name)
        params = self._params(name)
        for param in params:
            param.data = param.data.float()
        self.active, self._tuner_layers = UNKNOWN, None
        return params

    def _with_parent(self, adapter: str) -> str | list[str]:
        """What the base runs with for ``adapter``: a student that grows is its parent and itself."""
        return [PARENT, adapter] if adapter == STUDENT and self.frozen_rank else adapter

    def _named(self, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.transformer.named_parameters() if f".{adapter}." in n]

    def _params(self, adapter: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named(adapter)]

    def _train_flags(self) -> None:
        for params in self.params.values():
            for p in params:
                p.requires_grad_(True)
        for p in self._fixed:
            p.requires_grad_(False)

    def use(self, adapter: str | None) -> None:
        """Run the base with ``adapter`` active, or with no adapter at all for ``None`` (nothing to do
        when it is active already). What diffusers' ``set_adapter`` / ``disable_adapters`` do, on each
        adapter layer once."""
        if adapter == self.active:
            return
        if adapter is not None and adapter not in self.params and adapter not in self._teachers.values():
            raise ValueError(f"no adapter '{adapter}' on the base")
        for layer in self._layers():
            if adapter is None:
                layer.enable_adapters(False)
                continue
            if self.active is None or self.active == UNKNOWN:
                layer.enable_adapters(True)
            layer.set_adapter(self._with_parent(adapter))
        self.active = adapter
        self._train_flags()

    def _layers(self) -> list[Any]:
        """The base's adapter layers (peft's ``BaseTunerLayer``: each module some adapter adapts)."""
        if self._tuner_layers is None:
            self._tuner_layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        return self._tuner_layers

    def use_teacher(self, lora_path: str | None) -> None:
        """Activate the teacher LoRA at ``lora_path`` (None: the base model is the teacher)."""
        if lora_path is None:
            self.use(None)
            return
        name = self._teachers.get(lora_path)
        if name is None:
            name = self._load_teacher(lora_path)
        else:
            self._teachers.move_to_end(lora_path)
        self.use(name)

    def _load_teacher(self, lora_path: str) -> str:
        # peft activates an adapter it adds, picks another when the active one is deleted, and may wrap
        # more modules
        self.active, self._tuner_layers = UNKNOWN, None
        while len(self._teachers) >= self.max_teachers:
            _, old = self._teachers.popitem(last=False)
            self.transformer.delete_adapters([old])
        self.teacher_loads += 1
        name = f"teacher{self.teacher_loads}"
        lora = attach_teacher(self.transformer, self.components.teacher_providers(), lora_path, name)
        self._teachers[lora_path] = name
        self._train_flags()
        want = self.expected_sha256.get(lora_path)
        if want is not None and lora.sha256 != want:
            raise CloraError(
                f"the teacher LoRA {lora_path} changed while the run used it; put the old file back and "
                "`clora distill --resume`, or start over with the new one (`clora distill --fresh`)"
            )
        return name

    def state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        """peft state dict (``<module>.lora_A.weight`` ...) of ``adapter``, on CPU (a student that grows:
        its parent's components, then its own)."""
        sd = self._state_dict(adapter)
        if adapter != STUDENT or not self.frozen_rank:
            return sd
        fixed = self._state_dict(PARENT)
        return {k: torch.cat([fixed[k], v], dim=0 if _is_a(k) else 1) for k, v in sd.items()}

    def _state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        sd = get_peft_model_state_dict(self.transformer, adapter_name=adapter)
        return {k: v.detach().to("cpu").clone() for k, v in sd.items()}

    def load_leading(self, adapter: str, state: dict[str, torch.Tensor], scale: float) -> None:
        """Load a lower-rank ``state`` into the leading components of ``adapter`` (the rest keep their
        init: random A, zero B, so the output is unchanged); ``scale`` = the state's alpha/rank over
        this adapter's, folded into B. For a student that grows these are its fixed components."""
        own = self.state_dict(adapter)
        for key, value in state.items():
            cur = own[key]
            if _is_a(key):
                cur[: value.shape[0]] = value
            else:
                cur[:, : value.shape[1]] = value * scale
        self.load_state_dict(adapter, own)

    def load_state_dict(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        """Load a peft state dict into ``adapter`` (a student that grows: its parent's components
        first, as :meth:`state_dict` gives them)."""
        if adapter == STUDENT and self.frozen_rank:
            r = self.frozen_rank
            self._load(PARENT, {k: v[:r] if _is_a(k) else v[:, :r] for k, v in state.items()})
            state = {k: v[r:] if _is_a(k) else v[:, r:] for k, v in state.items()}
        self._load(adapter, state)
        self._train_flags()

    def _load(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        # set_peft_model_state_dict copies into the float32 parameters
        ref = self.params.get(adapter, self._fixed)[0]
        result = set_peft_model_state_dict(
            self.transformer, {k: v.to(ref.device, ref.dtype) for k, v in state.items()}, adapter_name=adapter
        )
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"unexpected keys loading {adapter}: {unexpected[:3]}")


def _is_a(key: str) -> bool:
    """A LoRA down (A) weight of a peft state dict, whose rows are the components (B: its columns)."""
    return key.endswith("lora_A.weight")
