"""Build (or reuse) the full toy base and the named teachers, and copy them into the package (maintainers).

    python scripts/ship_toy.py sepia invert hue-120 channel-swap warm tint-teal vignette blur cool solarize
    python scripts/ship_toy.py --force-teachers sepia invert   # retrain these on the shipped base

The files land in plugins/clora_toy/prebuilt/, laid out like CLORA_HOME/toy and keyed by the recipe
hash, so a recipe change (clora_toy/config.py) makes the shipped files unused until this is run again.
Every file carries its recipe in its header; `clora toy build-base --force` rebuilds from it.
"""

from __future__ import annotations

import argparse

import torch
from clora_toy import store
from clora_toy.build import build_base, build_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("effects", nargs="*", help="teachers to ship beside the base")
    parser.add_argument(
        "--force-teachers",
        action="store_true",
        help="train the named teachers again even if the cache or the package has them (the base is reused)",
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = build_base(size="full")
    print("base ->", store.ship(base.path.parent, store.BASE_FILES))
    for name in args.effects:
        teacher = build_teacher(name, size="full", force=args.force_teachers)
        print(f"{name} ->", store.ship(teacher.path.parent, store.TEACHER_FILES))


if __name__ == "__main__":
    main()
