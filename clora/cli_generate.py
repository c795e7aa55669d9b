"""``clora generate``: edit images with a unified LoRA (or, to compare, the old ways)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clora.cli_common import DeviceOption, DtypeOption, state
from clora.effects import list_images
from clora.errors import CloraError


def _inputs(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += list_images(p, what="--image folder")
        elif p.exists():
            files.append(p)
        else:
            raise CloraError(f"image not found: {p}")
    return files


# the options of this command
EffectOption = Annotated[
    list[str], typer.Option("--effect", help="Effect to apply; repeat to compose effects in order.")
]
ImageOption = Annotated[
    list[Path], typer.Option("--image", help="Input image or folder of images; repeatable.")
]
PromptOption = Annotated[str | None, typer.Option("--prompt", help="Extra text appended to the prompt.")]
StepsOption = Annotated[
    int | None,
    typer.Option("--steps", min=1, help="Sampling steps (default: the collection's, e.g. 4)."),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Noise seed.")]
CollectionOption = Annotated[
    int | None, typer.Option("--collection", help="Collection version (default: the latest).")
]
OutOption = Annotated[Path, typer.Option("--out", help="Output folder, or a .png file for a single input.")]
GridOption = Annotated[
    bool, typer.Option("--grid", help="Also write grid.png: input | each effect (| composed).")
]
TeacherOption = Annotated[
    bool,
    typer.Option("--teacher", help="The old way: base + the effect's own LoRA, full sampler + CFG."),
]
CascadeOption = Annotated[
    Path | None,
    typer.Option("--cascade", help="Baseline: effect LoRA stacked with this acceleration LoRA, few steps."),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
FuseOption = Annotated[
    bool,
    typer.Option(
        "--fuse/--no-fuse",
        help="Merge the unified LoRA into the base weights before sampling (faster; the outputs "
        "match the unfused LoRA within float rounding).",
    ),
]
ResolutionOption = Annotated[
    int | None,
    typer.Option(
        "--resolution",
        help="Edit at about this many pixels squared, each image keeping its aspect (default: the "
        "collection's; the toy edits one fixed size).",
    ),
]
NoProgressOption = Annotated[bool, typer.Option("--no-progress", help="Do not draw a progress bar.")]


def cmd_generate(
    ctx: typer.Context,
    effect: EffectOption,
    image: ImageOption,
    prompt: PromptOption = None,
    steps: StepsOption = None,
    seed: SeedOption = 0,
    collection: CollectionOption = None,
    out: OutOption = Path("clora-out"),
    grid: GridOption = False,
    teacher: TeacherOption = False,
    cascade: CascadeOption = None,
    batch_size: BatchSizeOption = 16,
    fuse: FuseOption = True,
    resolution: ResolutionOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    no_progress: NoProgressOption = False,
) -> None:
    """Edit images with one or more effects of a unified LoRA, in a few steps.

    Each image is edited at about the collection's resolution with its own aspect (images of one
    size share a batch), and written at its own aspect."""
    from clora.generate import editor_tag, generate_files, open_editor, output_paths

    st = state(ctx)
    files = _inputs(image)
    output_paths(files, out, editor_tag(effect, teacher, cascade is not None), grid)
    with st.open_registry(create=False) as reg:
        editor = open_editor(
            reg,
            st.components,
            effect,
            collection=collection,
            teacher=teacher,
            cascade=cascade,
            prompt=prompt,
            steps=steps,
            seed=seed,
            device=device,
            dtype=dtype,
            fuse=fuse,
        )
    done = generate_files(
        editor,
        files,
        out,
        batch_size=batch_size,
        resolution=resolution,
        grid=grid,
        show_progress=not no_progress,
    )
    if done.grid is not None:
        typer.echo(f"grid: {done.grid}")
    typer.echo(f"wrote {len(done.written)} image(s) to {out}")


def add_commands(app: typer.Typer) -> None:
    app.command("generate")(cmd_generate)
