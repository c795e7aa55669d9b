"""An example third-party clora plugin.

Install it with ``pip install -e examples/clora-example-plugin`` and it shows up in ``clora plugins``
with the captioner ``prompt-copy``, which captions every effect with its teacher prompt. Every kind of
object a plugin can register is described in ``docs/plugins.md`` and ``clora.contracts``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from clora import hookimpl
from clora.contracts import Captioner

if TYPE_CHECKING:
    from clora.registry.models import Effect


class PromptCopyCaptioner(Captioner):
    """Caption = the teacher prompt, verbatim."""

    captioner_id = "prompt-copy"

    def caption(self, effect: Effect) -> str:
        return str(effect.teacher_prompt)


@hookimpl
def register_captioners(register: Callable[[Captioner], None]) -> None:
    register(PromptCopyCaptioner())
