"""``clora toy ...``: build the toy base, train and register teachers, list the effects library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from clora.errors import DuplicateEffectError

TinyOpt = Annotated[
    bool, typer.Option("--tiny", help="Use the test-size base 'toy-tiny' (16x16, seconds); = --size tiny.")
]
SizeOpt = Annotated[
    str,
    typer.Option(
        "--size",
        help="Which toy world: full ('toy', the default base) or tiny ('toy-tiny', the tests').",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device to train on.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rebuild even if the cache holds this recipe.")]


def _size(tiny: bool, size: str) -> str:
    """``--tiny`` or ``--size``; a bad size is a one-line error."""
    from clora_toy.factory import get_factory

    return get_factory(tiny, size).backbone_id


def _threads(backbone_id: str) -> None:
    import torch

    # two threads is what was measured for the toy; the tiny model gains nothing from a second
    # thread, and on a busy machine two threads stall each other
    torch.set_num_threads(1 if backbone_id == "toy-tiny" else min(2, torch.get_num_threads()))


def toy_app() -> typer.Typer:
    """The ``toy`` command group."""
    app = typer.Typer(no_args_is_help=True)

    @app.command("build-base")
    def build_base_cmd(
        tiny: TinyOpt = False, size: SizeOpt = "full", device: DeviceOpt = "cpu", force: ForceOpt = False
    ) -> None:
        """Train the toy base editor (cached: a second run reuses it) and write a contact sheet."""
        from clora_toy.build import build_base

        size = "tiny" if tiny else size
        _threads(_size(False, size))
        result = build_base(device=device, force=force, size=size)
        verb = _verb(result, "built")
        typer.echo(f"{verb} base {result.report.get('backbone_id', '')}: {result.path}")
        psnr = result.report.get("psnr")
        if isinstance(psnr, dict) and psnr:
            typer.echo("PSNR dB (held-out): " + ", ".join(f"{k} {v}" for k, v in psnr.items()))
        typer.echo(f"contact sheet: {result.sheet}")

    @app.command("teachers")
    def teachers_cmd(
        ctx: typer.Context,
        effects: Annotated[list[str], typer.Argument(help="Effect names (see `clora toy effects`).")],
        tiny: TinyOpt = False,
        size: SizeOpt = "full",
        device: DeviceOpt = "cpu",
        force: ForceOpt = False,
        register: Annotated[
            bool, typer.Option("--register/--no-register", help="Add each teacher to the registry.")
        ] = True,
    ) -> None:
        """Train a teacher LoRA per effect on the built base and register it as an effect."""
        from clora_toy.build import build_teacher
        from clora_toy.effects import get_effect
        from clora_toy.factory import get_factory

        chosen = [get_effect(name) for name in effects]
        size = "tiny" if tiny else size
        factory = get_factory(size=size)
        _threads(factory.backbone_id)
        backbone = factory.load(device)
        for effect in chosen:
            result = build_teacher(effect, device=device, force=force, backbone=backbone, size=size)
            r = result.report
            verb = _verb(result, "trained")
            if effect.stochastic:
                typer.echo(
                    f"{verb} teacher '{effect.name}' (stochastic): PSNR of its mean over seeds "
                    f"{r.get('psnr')} dB (base without LoRA {r.get('base_psnr')} dB), diversity "
                    f"{r.get('diversity')} (truth {r.get('truth_diversity')}) -> {result.path}"
                )
            else:
                typer.echo(
                    f"{verb} teacher '{effect.name}': PSNR {r.get('psnr')} dB (base without LoRA "
                    f"{r.get('base_psnr')} dB) -> {result.path}"
                )
            if register:
                _register(
                    ctx, effect.name, str(result.path), effect.prompt, factory.backbone_id, result.cached
                )

    @app.command("effects")
    def effects_cmd(
        as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
        limit: Annotated[int | None, typer.Option("--limit", help="Only the first N effects.")] = None,
    ) -> None:
        """List the library of effects with known ground truth (stochastic ones, drawn at random, marked)."""
        from clora_toy.effects import effects_library

        chosen = effects_library(limit)
        if as_json:
            rows = [
                {"name": e.name, "family": e.family, "prompt": e.prompt, "stochastic": e.stochastic}
                for e in chosen
            ]
            typer.echo(json.dumps(rows, indent=2))
            return
        for e in chosen:
            mark = "  (stochastic: the result is drawn at random)" if e.stochastic else ""
            typer.echo(f"{e.name:24} {e.family:11} {e.prompt}{mark}")

    @app.command("sources")
    def sources_cmd(
        out: Annotated[Path, typer.Option("--out", help="Folder to write the PNG images to.")],
        n: Annotated[int, typer.Option("-n", help="How many images.")] = 8,
        seed: Annotated[int, typer.Option("--seed", help="Which held-out set (no trainer sees these).")] = 0,
        tiny: TinyOpt = False,
        size: SizeOpt = "full",
    ) -> None:
        """Write held-out procedural source images, e.g. as input for `clora generate`."""
        from clora.images import write_png
        from clora_toy.data import held_out_sources
        from clora_toy.factory import get_factory

        side = get_factory(tiny, size).config.model.image_size
        for i, image in enumerate(held_out_sources(n, side, seed)):
            write_png(image, out / f"source{i:02d}.png")
        typer.echo(f"wrote {n} image(s) of {side}x{side} to {out}")

    return app


def _verb(result: Any, fresh: str) -> str:
    if result.shipped:
        return "installed shipped"
    return "reused cached" if result.cached else fresh


def _same_teacher_older_recipe(old: Path, new: Path) -> bool:
    """Whether ``old`` is the same effect's teacher, built by this plugin for the same backbone id under
    an older base or teacher recipe: ``<toy root>/<id>-<base hash>/teachers/<effect>-<hash>/<file>``."""

    def unhashed(folder: Path) -> str:
        return folder.name.rsplit("-", 1)[0]

    if len(old.parents) < 4 or old.name != new.name or old.parents[1].name != "teachers":
        return False
    return (
        old.parents[3] == new.parents[3]
        and unhashed(old.parents[0]) == unhashed(new.parents[0])
        and unhashed(old.parents[2]) == unhashed(new.parents[2])
    )


def _register(ctx: typer.Context, name: str, lora_path: str, prompt: str, base_id: str, cached: bool) -> None:
    from clora.effects import add_effect, update_lora

    state: Any = ctx.find_root().obj
    with state.open_registry() as reg:
        try:
            eff = add_effect(
                reg, state.components, name=name, lora_path=lora_path, prompt=prompt, base=base_id
            )
        except DuplicateEffectError:
            old_path, new_path = Path(reg.get_effect(name).lora_path), Path(lora_path).resolve()
            if old_path == new_path and not cached:
                update_lora(reg, state.components, name, lora_path, base_id)
                typer.echo(f"  effect '{name}' was registered; now points at the retrained file")
            elif old_path != new_path and _same_teacher_older_recipe(old_path, new_path):
                update_lora(reg, state.components, name, lora_path, base_id)
                typer.echo(f"  effect '{name}' was registered; now points at the current recipe's teacher")
            else:
                typer.echo(f"  effect '{name}' is already registered; left as it is")
            return
    typer.echo(f"  registered effect '{eff.name}' with trigger '{eff.trigger}'")
