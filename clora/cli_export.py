"""``clora export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clora.cli_common import print_json, state


def add_commands(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        ctx: typer.Context,
        fmt: Annotated[
            str,
            typer.Option(
                "--format",
                help="diffusers: a .safetensors file for diffusers (load_lora_adapter, a pipeline's "
                "load_lora_weights); peft: a folder for PeftModel.from_pretrained "
                "(adapter_model.safetensors, adapter_config.json); comfyui: a kohya-layout .safetensors "
                "file (lora_unet_*, .alpha) for ComfyUI's LoRA loaders. Every format keeps clora's header "
                "(triggers, prompts, sampler).",
                show_default=False,
            ),
        ],
        out: Annotated[
            Path,
            typer.Option(
                "--out",
                help="diffusers, comfyui: a .safetensors file (the card goes beside it as <name>.README.md) "
                "or a folder (it gets clora-v<N>[.comfyui].safetensors and README.md, ready to upload as a "
                "Hugging Face model repository). peft: a folder (it gets the card as README.md).",
                show_default=False,
            ),
        ],
        collection: Annotated[
            int | None, typer.Option("--collection", help="Collection version (default: the latest).")
        ] = None,
        force: Annotated[
            bool,
            typer.Option(
                "--force",
                help="Replace an existing output (a peft folder only if it holds adapter_config.json).",
            ),
        ] = False,
        no_card: Annotated[
            bool,
            typer.Option(
                "--no-card",
                help="Write no model card (README.md: base, effects and triggers, the few-step sampler as "
                "diffusers code, the evaluation table).",
            ),
        ] = False,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print what was written as JSON (paths, rank, alpha, effects).")
        ] = False,
    ) -> None:
        """Export a collection's unified LoRA for diffusers, peft or ComfyUI, with a model card."""
        from clora.export import export

        st = state(ctx)
        with st.open_registry(create=False) as reg:
            result = export(reg, st.components, collection, fmt, out, card=not no_card, force=force)
        if as_json:
            print_json(result.to_dict())
            return
        typer.echo(
            f"exported collection v{result.version} ({len(result.effects)} effect(s), "
            f"{result.modules} modules, rank {result.rank}) as {result.format}: {result.lora}"
        )
        if result.card:
            typer.echo(f"model card: {result.card}")
        for note in result.notes:
            typer.echo(f"note: {note}")
