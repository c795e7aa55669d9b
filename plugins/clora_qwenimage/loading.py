"""Loading a Qwen-Image-Edit(-Plus) folder with diffusers, also where torchvision is not installed.

``Qwen2VLProcessor.from_pretrained`` (and so the pipeline's ``from_pretrained``) needs torchvision for
its video processor, which the image-editing pipelines never use. Without torchvision clora builds the
processor itself from the folder's ``processor/`` files: the PIL image processor, the tokenizer, and no
video processor, and hands it to the pipeline's ``from_pretrained``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from unittest import mock


def make_qwen2vl_processor(image_processor: Any, tokenizer: Any) -> Any:
    """A ``Qwen2VLProcessor`` without a video processor (which works without torchvision).

    The processor checks the class of every sub-processor, the absent video processor too, and that
    check fails without torchvision; it is skipped for the absent video processor only.
    """
    from transformers import ProcessorMixin, Qwen2VLProcessor

    check = ProcessorMixin.check_argument_for_proper_class

    def check_present(self: Any, argument_name: str, argument: Any) -> Any:
        if argument is None and argument_name == "video_processor":
            return None
        return check(self, argument_name, argument)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check_present):
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


def load_processor(folder: Path) -> Any:
    """The folder's ``processor/``: transformers' own loader, or (no torchvision) the PIL image processor
    and the tokenizer without a video processor."""
    from transformers import Qwen2VLProcessor

    try:
        return Qwen2VLProcessor.from_pretrained(str(folder), local_files_only=True)
    except ImportError:  # its video processor needs torchvision
        return _processor_without_video(folder)


def _processor_without_video(folder: Path) -> Any:
    """The PIL image processor and the tokenizer of ``folder``, without a video processor."""
    from transformers import AutoTokenizer

    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor  # transformers 5
    except ImportError:  # transformers 4: the slow image processor is the PIL one
        from transformers import Qwen2VLImageProcessor as ImageProcessor  # type: ignore[assignment]
    image_processor = ImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return make_qwen2vl_processor(
        image_processor, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    )


def load_pipeline(pipeline_class: Any, folder: Path, dtype: Any) -> Any:
    """``pipeline_class.from_pretrained(folder)`` offline, safetensors only, every component in ``dtype``
    (the text encoder too: transformers would keep its saved dtype)."""
    import diffusers
    import transformers

    processor = load_processor(folder / "processor")
    # the libraries' loading bars help at a terminal (a real base loads for minutes), not in logs
    quiet = not sys.stderr.isatty()
    if quiet:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        return pipeline_class.from_pretrained(
            str(folder), processor=processor, dtype=dtype, use_safetensors=True, local_files_only=True
        )
    finally:
        if quiet:
            diffusers.utils.logging.enable_progress_bar()
            transformers.utils.logging.enable_progress_bar()
