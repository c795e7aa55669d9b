"""An example third-party clora plugin.

Install it with ``pip install -e examples/clora-example-plugin`` and it shows up in ``clora plugins``
with the captioner ``prompt-copy``, which captions every effect with its teacher prompt.
"""

from __future__ import annotations

from typing import Any

from clora import hookimpl


class PromptCopyCaptioner:
    """Caption = the teacher prompt, verbatim."""

    captioner_id = "prompt-copy"

    def caption(self, effect: Any) -> str:
        return str(effect.teacher_prompt)


@hookimpl
def register_captioners(register: Any) -> None:
    register(PromptCopyCaptioner())
