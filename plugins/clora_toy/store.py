"""Where built toy artifacts live: ``$CLORA_HOME/toy/<backbone>-<hash>/``, keyed by the recipe.

The package also ships a few of them, built by this plugin's own ``clora toy build-base`` and
``clora toy teachers`` with the recipe in each file's header, in ``prebuilt/`` under the same layout.
A cache miss for a shipped recipe installs the shipped files into the cache instead of training, so
the demo need not spend half an hour rebuilding what every user would build identically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from clora.fileio import atomic_path
from clora.paths import clora_home
from clora_toy.config import ToyConfig

BASE_WEIGHTS = "base.safetensors"
BASE_SHEET = "base_sheet.png"
BASE_REPORT = "base.json"
TEACHER_WEIGHTS = "lora.safetensors"
TEACHER_SHEET = "sheet.png"
TEACHER_REPORT = "teacher.json"

BASE_FILES = (BASE_REPORT, BASE_SHEET, BASE_WEIGHTS)
TEACHER_FILES = (TEACHER_REPORT, TEACHER_SHEET, TEACHER_WEIGHTS)

#: the shipped artifacts, laid out like ``$CLORA_HOME/toy``
SHIPPED = Path(__file__).parent / "prebuilt"


def toy_root() -> Path:
    """The toy part of the cache."""
    return clora_home() / "toy"


def base_dir(backbone_id: str, config: ToyConfig) -> Path:
    """Folder of one built base (its weights, contact sheet and report)."""
    return toy_root() / f"{backbone_id}-{config.base_hash()}"


def teacher_dir(backbone_id: str, config: ToyConfig, effect_name: str) -> Path:
    """Folder of one effect's teacher LoRA on one built base."""
    return base_dir(backbone_id, config) / "teachers" / f"{effect_name}-{config.teacher_hash(effect_name)}"


def shipped_dir(folder: Path) -> Path:
    """The shipped counterpart of a cache folder (it may not exist)."""
    return SHIPPED / folder.relative_to(toy_root())


def install_shipped(folder: Path, files: tuple[str, ...]) -> bool:
    """Copy the shipped ``files`` of ``folder``'s recipe into the cache; False if none are shipped.

    The weights file is the last one of ``files`` and is copied last, atomically, so its presence in
    the cache always means a complete install.
    """
    src = shipped_dir(folder)
    if not (src / files[-1]).is_file():
        return False
    for name in files:
        if (src / name).is_file():
            with atomic_path(folder / name) as tmp:
                shutil.copyfile(src / name, tmp)
    return True


def ship(folder: Path, files: tuple[str, ...]) -> Path:
    """Copy a built cache folder's ``files`` into the package's ``prebuilt/`` (for maintainers)."""
    dest = shipped_dir(folder)
    for name in files:
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(folder / name, tmp)
    return dest
