"""Qwen-Image-Edit from a local diffusers folder: the kinds ``qwen-image-edit-plus`` (the 2509 and
later releases, ``QwenImageEditPlusPipeline``) and ``qwen-image-edit`` (``QwenImageEditPipeline``).

``clora base add NAME --path DIR`` records such a folder; this plugin loads it with diffusers' own
classes and runs it as the pipeline does. Importing the package stays cheap (no torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clora import hookimpl


@hookimpl
def register_base_kinds(register: Callable[[Any], None]) -> None:
    from clora_qwenimage.backbone import KINDS

    for kind in KINDS:
        register(kind)
