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
            files += list_images(p)
        elif p.exists():
            files.append(p)
        else:
            raise CloraError(f"image not found: {p}")
    return files


def add_commands(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        ctx: typer.Context,
        effect: Annotated[
            list[str], typer.Option("--effect", help="Effect to apply; repeat to compose effects in order.")
        ],
        image: Annotated[
            list[Path], typer.Option("--image", help="Input image or folder of images; repeatable.")
        ],
        prompt: Annotated[
            str | None, typer.Option("--prompt", help="Extra text appended to the prompt.")
        ] = None,
        steps: Annotated[
            int | None, typer.Option("--steps", help="Sampling steps (default: the collection's, e.g. 4).")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="Noise seed.")] = 0,
        collection: Annotated[
            int | None, typer.Option("--collection", help="Collection version (default: the latest).")
        ] = None,
        out: Annotated[
            Path, typer.Option("--out", help="Output folder, or a .png file for a single input.")
        ] = Path("clora-out"),
        grid: Annotated[
            bool, typer.Option("--grid", help="Also write grid.png: input | each effect (| composed).")
        ] = False,
        teacher: Annotated[
            bool,
            typer.Option("--teacher", help="The old way: base + the effect's own LoRA, full sampler + CFG."),
        ] = False,
        cascade: Annotated[
            Path | None,
            typer.Option(
                "--cascade", help="Baseline: effect LoRA stacked with this acceleration LoRA, few steps."
            ),
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 16,
        fuse: Annotated[
            bool,
            typer.Option(
                "--fuse/--no-fuse",
                help="Merge the unified LoRA into the base weights before sampling (faster; the outputs "
                "match the unfused LoRA within float rounding).",
            ),
        ] = True,
        resolution: Annotated[
            int | None,
            typer.Option(
                "--resolution",
                help="Edit at about this many pixels squared, each image keeping its aspect (default: the "
                "collection's; the toy edits one fixed size).",
            ),
        ] = None,
        device: DeviceOption = "cpu",
        dtype: DtypeOption = None,
        no_progress: Annotated[
            bool, typer.Option("--no-progress", help="Do not draw a progress bar.")
        ] = False,
    ) -> None:
        """Edit images with one or more effects of a unified LoRA, in a few steps.

        Each image is edited at about the collection's resolution with its own aspect (images of one
        size share a batch), and written at its own aspect."""
        import torch

        from clora.bases import get_factory
        from clora.devices import pick
        from clora.distill.config import DistillConfig, read_config
        from clora.distill.prepare import read_source
        from clora.generate import UnifiedModel, cascade_edit, teacher_edit
        from clora.images import contact_sheet, write_png
        from clora.progress import progress_bar

        st = state(ctx)
        if (teacher or cascade) and len(effect) > 1:
            raise CloraError("--teacher and --cascade run one effect's own LoRA; pass a single --effect")
        if teacher and cascade:
            raise CloraError("choose one of --teacher and --cascade")
        files = _inputs(image)
        with st.open_registry(create=False) as reg:
            registered = {name: reg.get_effect(name) for name in effect}  # unknown: "did you mean"
            # --teacher needs only the effect's own LoRA; everything else runs from a collection
            col = reg.get_collection(collection) if teacher else reg.require_collection(collection)
            if col is not None and not (teacher or cascade):
                members = {m.effect_name for m in col.members}
                for name in effect:
                    if name not in members:
                        having = [
                            c.version
                            for c in reg.list_collections()
                            if name in {m.effect_name for m in c.members}
                        ]
                        where = (
                            f"it is in collection v{having[-1]} (--collection {having[-1]})"
                            if having
                            else "it needs a distill (`clora distill --incremental`)"
                        )
                        raise CloraError(f"effect '{name}' is not in collection v{col.version}; {where}")
            cfg = read_config(col.config_json) if col is not None else DistillConfig()
            if teacher or cascade:
                e = registered[effect[0]]
                base_id = e.base_id or (col.base_id if col is not None else None)
                if base_id is None:
                    raise CloraError(f"effect '{e.name}' is unbound; pass it a base with `clora base use ID`")
                factory = get_factory(st.components, reg, base_id)
                dev, dt, _ = pick(device, dtype, factory.default_dtype(device))
                bb = factory.load(dev, dt)
                model = None
            else:
                assert col is not None
                model = UnifiedModel.load(
                    st.components, col.file, device=device, dtype=dtype, fuse=fuse, registry=reg
                )
                bb = model.backbone
        res, g = resolution or cfg.data.resolution, cfg.teachers.guidance
        single_file = len(files) == 1 and out.suffix.lower() == ".png"
        if not single_file:
            out.mkdir(parents=True, exist_ok=True)
        tag = "+".join(effect) + (".teacher" if teacher else ".cascade" if cascade else "")
        rows: list[list[torch.Tensor]] = []
        written: list[Path] = []
        # images of one edit size share a batch; each is written back at its own aspect
        sized = [(f, read_source(f, bb, res)) for f in files]
        by_size: dict[tuple[int, int], list[tuple[Path, torch.Tensor]]] = {}
        for f, img in sized:
            by_size.setdefault(tuple(img.shape[-2:]), []).append((f, img))  # type: ignore[arg-type]
        with progress_bar(not no_progress) as bar:
            task = bar.add_task("generate", total=len(files), info="")
            for group in by_size.values():
                for i in range(0, len(group), batch_size):
                    chunk = group[i : i + batch_size]
                    images = torch.stack([img for _, img in chunk]).to(bb.device, bb.dtype)
                    if model is None:
                        if teacher:
                            edited = teacher_edit(
                                bb,
                                st.components,
                                e.lora_path,
                                e.teacher_prompt,
                                images,
                                steps=steps or cfg.teachers.steps or bb.default_teacher_steps,
                                guidance=bb.default_guidance if g is None else g,
                                seed=seed,
                            )
                        else:
                            assert cascade is not None
                            edited = cascade_edit(
                                bb,
                                st.components,
                                e.lora_path,
                                e.teacher_prompt,
                                cascade,
                                images,
                                steps=steps,
                                seed=seed,
                            )
                    else:
                        edited = model.edit(images, effect, prompt=prompt, steps=steps, seed=seed)
                    for (f, _), img in zip(chunk, edited, strict=True):
                        target = out if single_file else out / f"{f.stem}.{tag}.png"
                        write_png(img, target, aspect_of=f)
                        written.append(target)
                    if grid:
                        columns = [images]
                        if len(effect) > 1 and model is not None:
                            columns += [
                                model.edit(images, [name], prompt=prompt, steps=steps, seed=seed)
                                for name in effect
                            ]
                        columns.append(edited)
                        rows += [[c[j] for c in columns] for j in range(len(chunk))]
                    bar.advance(task, len(chunk))
        if grid:
            sheet = (out.parent if single_file else out) / f"grid.{tag}.png"
            contact_sheet(rows, sheet)
            typer.echo(f"grid: {sheet}")
        typer.echo(f"wrote {len(written)} image(s) to {out}")
