"""The ``clora`` command line, built by :func:`make_app` from a plugin manager."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import pluggy
import typer
from rich.table import Table

from clora import __version__
from clora.cli_common import AppState, CloraGroup, console, print_json, state
from clora.effects import DEFAULT_BASE_KEY, add_effect, list_images
from clora.errors import CloraError
from clora.paths import registry_path
from clora.plugins import describe_plugins, get_plugin_manager


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clora {__version__}")
        raise typer.Exit()


def make_app(pm: pluggy.PluginManager) -> typer.Typer:
    """The root typer app: built-in commands plus every plugin's ``register_commands``."""
    app = typer.Typer(
        cls=CloraGroup,
        no_args_is_help=True,
        help="Distill many image-effect LoRAs and few-step sampling into one LoRA.",
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        registry: Annotated[
            Path | None,
            typer.Option(
                "--registry",
                envvar="CLORA_REGISTRY",
                help="Registry database file (default ./registry.db).",
                show_default=False,
            ),
        ] = None,
        version: Annotated[
            bool,
            typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
        ] = False,
    ) -> None:
        ctx.obj = AppState(pm=pm, registry_file=registry_path(registry))

    app.add_typer(_effect_app(), name="effect", help="Register, list, show and remove effect LoRAs.")
    app.add_typer(
        _base_app(), name="base", help="Add, list, show and remove base models; choose the default."
    )

    @app.command("plugins")
    def plugins_cmd(
        ctx: typer.Context,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print JSON (see README, 'JSON output').")
        ] = False,
    ) -> None:
        """List installed plugins, their versions, the hooks they implement and what they register."""
        st = state(ctx)
        rows = describe_plugins(st.pm, st.components)
        if as_json:
            print_json(rows)
            return
        table = Table("plugin", "version", "hooks", "registers")
        for r in rows:
            regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in r["registers"].items())
            table.add_row(r["name"], r["version"] or "-", ", ".join(r["hooks"]), regs or "-")
        console.print(table)

    from clora import cli_distill, cli_eval, cli_export, cli_generate

    cli_distill.add_commands(app)
    cli_generate.add_commands(app)
    cli_eval.add_commands(app)
    cli_export.add_commands(app)
    pm.hook.register_commands(app=app)
    return app


def effect_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Effect name: 1-64 letters, digits, '-', '_', '.'.")],
    lora: Annotated[
        Path,
        typer.Option(
            "--lora",
            help="The effect's LoRA: a .safetensors file (diffusers, kohya/musubi, ComfyUI, ai-toolkit "
            "layouts) or a peft adapter folder.",
        ),
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt the LoRA was trained with.")],
    trigger: Annotated[
        str | None,
        typer.Option("--trigger", help="Trigger word for the unified LoRA (default: allocate one)."),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base model id (default: the workspace default, else unbound)."),
    ] = None,
    examples: Annotated[
        Path | None,
        typer.Option("--examples", help="Folder of example source images for this effect."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new effect as JSON.")] = False,
) -> None:
    """Register an effect LoRA under NAME and allocate its trigger word."""
    st = state(ctx)
    with st.open_registry() as reg:
        eff = add_effect(
            reg,
            st.components,
            name=name,
            lora_path=lora,
            prompt=prompt,
            base=base,
            trigger=trigger,
            examples=examples,
        )
    if as_json:
        print_json(eff.to_dict())
    else:
        bound = f"base {eff.base_id}" if eff.base_id else "unbound (checked against the base at distill)"
        found = f", {len(list_images(eff.examples_dir))} example image(s)" if eff.examples_dir else ""
        typer.echo(
            f"added effect '{eff.name}' with trigger '{eff.trigger}' ({eff.lora_format}, "
            f"rank {eff.rank}, {bound}{found})"
        )


def effect_update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name of a registered effect.")],
    lora: Annotated[
        Path, typer.Option("--lora", help="The effect's new LoRA (.safetensors file or peft folder).")
    ],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base model id (default: the effect's current base)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the effect as JSON.")] = False,
) -> None:
    """Give an effect a new LoRA file (a retrained one); its trigger, prompt and caption stay."""
    from clora.effects import update_lora

    st = state(ctx)
    with st.open_registry(create=False) as reg:
        eff = update_lora(reg, st.components, name, lora, base)
    if as_json:
        print_json(eff.to_dict())
    else:
        typer.echo(
            f"updated effect '{eff.name}' (trigger '{eff.trigger}' kept): {eff.lora_path} "
            f"({eff.lora_format}, rank {eff.rank}); the next `clora distill` uses it"
        )


def effect_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of effects.")] = False,
) -> None:
    """List registered effects."""
    st = state(ctx)
    effects = []
    if st.registry_exists():
        with st.open_registry(create=False) as reg:
            effects = reg.list_effects(retired=True)
    if as_json:
        print_json([e.to_dict() for e in effects])
        return
    if not effects:
        typer.echo(f"no effects in {st.registry_file}; add one with `clora effect add`")
        return
    table = Table("name", "trigger", "base", "format", "rank", "status", "teacher prompt")
    for e in effects:
        table.add_row(
            e.name, e.trigger, e.base_id or "-", e.lora_format, str(e.rank), e.status, e.teacher_prompt
        )
    console.print(table)


def effect_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Effect name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one effect in full."""
    st = state(ctx)
    with st.open_registry(create=False) as reg:
        data = reg.get_effect(name).to_dict()
    if as_json:
        print_json(data)
        return
    lora = data.pop("lora")
    for k, v in data.items():
        typer.echo(f"{k:15} {v if v is not None else '-'}")
    for k, v in lora.items():
        typer.echo(f"lora.{k:10} {', '.join(v) if isinstance(v, list) else v}")


def effect_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Effect name.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Remove an effect a collection (or an unfinished distill run) holds: it is retired, its "
            "trigger and file record kept so the collection can still be grown.",
        ),
    ] = False,
) -> None:
    """Remove an effect (its trigger stays reserved; collections that include it keep it)."""
    st = state(ctx)
    with st.open_registry(create=False) as reg:
        retired = reg.remove_effect(name, force=force)
    if retired:
        typer.echo(
            f"removed effect '{name}' (retired: collections keep it and can still be grown; "
            f"`clora effect add {name}` brings it back with its trigger)"
        )
    else:
        typer.echo(f"removed effect '{name}'")


def _effect_app() -> typer.Typer:
    effect = typer.Typer(cls=CloraGroup, no_args_is_help=True)

    effect.command("add")(effect_add)
    effect.command("update")(effect_update)
    effect.command("list")(effect_list)
    effect.command("show")(effect_show)
    effect.command("remove")(effect_remove)
    return effect


def _size(info: dict[str, Any]) -> str:
    """A base's weights on disk, e.g. '57.7 GB' (transformer + text encoder + VAE)."""
    weights = info.get("weights") or {}
    total = sum(int(w.get("bytes") or 0) for w in weights.values()) or int(info.get("bytes") or 0)
    return "-" if not total else f"{total / 1e9:.1f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"


def _dtype(info: dict[str, Any]) -> str:
    weights = info.get("weights") or {}
    return str((weights.get("transformer") or {}).get("dtype") or info.get("dtype") or "-")


def base_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of bases.")] = False,
) -> None:
    """List base models: the installed plugins' own (toy, toy-tiny) and the folders added here."""
    from clora.bases import describe_bases

    st = state(ctx)
    default = None
    if st.registry_exists():
        with st.open_registry(create=False) as reg:
            default = reg.get_setting(DEFAULT_BASE_KEY)
            rows = describe_bases(st.components, reg)
    else:
        rows = describe_bases(st.components, None)
    if as_json:
        print_json([{**r, "default": r["name"] == default} for r in rows])
        return
    table = Table("", "name", "kind", "dtype", "size", "where")
    for r in rows:
        where = r.get("path") or r.get("description") or "-"
        mark = "*" if r["name"] == default else ""
        table.add_row(mark, r["name"], r.get("kind") or "-", _dtype(r), _size(r), where)
    console.print(table)


def base_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name to record the base under (used with --base).")],
    path: Annotated[
        Path, typer.Option("--path", help="Local diffusers pipeline folder (with model_index.json).")
    ],
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            help="Base kind (default: detected from model_index.json): qwen-image-edit-plus, "
            "qwen-image-edit, or a plugin's kind (`clora plugins`).",
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="KEY=VALUE option of the base kind (see README); repeatable."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a base of that name.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new base as JSON.")] = False,
) -> None:
    """Record a local model folder as base NAME (checked and fingerprinted; nothing is copied)."""
    from clora.bases import add_base, describe_bases

    st = state(ctx)
    with st.open_registry() as reg:
        row = add_base(reg, st.components, name, path, kind, option, replace=force)
        data = next(r for r in describe_bases(st.components, reg) if r["name"] == row.name)
    if as_json:
        print_json(data)
    else:
        typer.echo(f"added base '{row.name}' ({row.kind}, {_dtype(data)}, {_size(data)}) at {row.path}")


def base_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Base name (see `clora base list`).")],
) -> None:
    """Show one base model as JSON: kind, path, options, fingerprint, weights per component."""
    from clora.bases import describe_bases, get_factory

    st = state(ctx)
    reg_ctx = st.open_registry(create=False) if st.registry_exists() else contextlib.nullcontext(None)
    with reg_ctx as reg:
        get_factory(st.components, reg, name)  # an unknown name is an error listing the bases
        rows = describe_bases(st.components, reg)
    print_json(next(r for r in rows if r["name"] == name))


def base_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name of a base added with `clora base add`.")],
) -> None:
    """Forget a base added with `clora base add` (its folder is left as it is)."""
    st = state(ctx)
    with st.open_registry(create=False) as reg:
        reg.remove_base(name)
        if reg.get_setting(DEFAULT_BASE_KEY) == name:
            reg.set_setting(DEFAULT_BASE_KEY, "")
    typer.echo(f"removed base '{name}'")


def base_use(
    ctx: typer.Context,
    base_id: Annotated[str, typer.Argument(help="Base name (see `clora base list`).")],
) -> None:
    """Make BASE_ID the workspace default for `clora effect add`."""
    from clora.bases import get_factory

    st = state(ctx)
    with st.open_registry() as reg:
        get_factory(st.components, reg, base_id)
        reg.set_setting(DEFAULT_BASE_KEY, base_id)
    typer.echo(f"default base is now '{base_id}'")


def _base_app() -> typer.Typer:
    base = typer.Typer(cls=CloraGroup, no_args_is_help=True)

    base.command("list")(base_list)
    base.command("add")(base_add)
    base.command("show")(base_show)
    base.command("remove")(base_remove)
    base.command("use")(base_use)
    return base


def main() -> None:
    """Console entry point."""
    # peft warns on every adapter switch clora makes on purpose (several adapters on one base)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
    try:
        app = make_app(get_plugin_manager())
    except CloraError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    app()
