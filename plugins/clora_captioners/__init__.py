"""The built-in captioner: a deterministic descriptive caption from the effect's name and teacher prompt.

A VLM captioner can replace it through ``register_captioners`` (``--captioner`` / config ``captioner``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from clora import hookimpl
from clora.contracts import Captioner

if TYPE_CHECKING:
    from clora.registry.models import Effect

_IMPERATIVE = re.compile(r"^(please\s+)?(apply|make|turn|give|add|convert|render|transform)\s+", re.I)


class TemplateCaptioner(Captioner):
    """ "<what the prompt does>, <name> effect": describes the result, not the instruction."""

    captioner_id = "template"

    def caption(self, effect: Effect) -> str:
        prompt = str(effect.teacher_prompt).strip().rstrip(".")
        what = _IMPERATIVE.sub("", prompt) or prompt
        label = re.sub(r"[-_.]+", " ", str(effect.name)).strip()
        return f"the image with {what}, {label} effect"


@hookimpl
def register_captioners(register: Callable[[Captioner], None]) -> None:
    register(TemplateCaptioner())
