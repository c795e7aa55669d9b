"""Help for every command, captions, and the empty states of `collections` and `runs`."""

from __future__ import annotations

from helpers import plugin_manager, run

COMMANDS = [
    [],
    ["effect", "add"],
    ["effect", "list"],
    ["effect", "show"],
    ["effect", "remove"],
    ["plugins"],
    ["base", "use"],
    ["base", "list"],
    ["base", "add"],
    ["base", "show"],
    ["base", "remove"],
    ["effect", "update"],
    ["export"],
    ["distill"],
    ["generate"],
    ["eval"],
    ["caption"],
    ["collections"],
    ["runs"],
    ["toy", "build-base"],
    ["toy", "teachers"],
    ["toy", "effects"],
    ["toy", "sources"],
]


def test_every_command_and_option_has_help() -> None:
    pm = plugin_manager()
    for args in COMMANDS:
        r = run(pm, *args, "--help")
        assert r.exit_code == 0, args
        assert "Usage" in r.stdout
        # every option line carries a description, not just its name
        for line in r.stdout.splitlines():
            stripped = line.strip()
            if stripped.startswith("--") and not stripped.startswith("--help"):
                assert len(stripped.split(None, 2)) >= 2, (args, stripped)


def test_distill_help_states_the_config_defaults() -> None:
    # the help text is static (no config import on start-up), so it must be kept in step by hand
    from clora.backbone import RankRule
    from clora.distill.config import DistillConfig

    d, rule = DistillConfig(), RankRule()
    assert d.student.rank is None and d.incremental.grow_rank is None
    # rich wraps the help in a box: drop its borders and line breaks
    text = " ".join(run(plugin_manager(), "distill", "--help").stdout.replace("│", " ").split())
    assert d.anchoring.share == 1.0 and "the whole run anchors" in text
    for phrase in (
        f"max({d.steps}, {d.steps_per_effect} per effect)",
        f"incremental: {d.incremental.steps_per_new_effect} per new effect",
        f"(default {d.student.few_steps})",
        f"(default {d.data.p_switch})",
        f"(default {d.optimizer.batch_size})",
        # the rank rule of the toy base, which the help quotes
        f"{rule.per_effect} per effect, rounded up to a multiple of {rule.step}, {rule.least} to {rule.most}",
        f"sqrt({rule.lr_rank} / rank)",
        f"by at least {rule.least}",
    ):
        assert phrase in text, phrase


def test_empty_states() -> None:
    pm = plugin_manager()
    assert "no collections yet" in run(pm, "collections").stdout
    assert run(pm, "collections", "--json").stdout.strip() == "[]"
    assert "no runs yet" in run(pm, "runs").stdout


def test_caption_fills_missing_captions(make_lora) -> None:  # type: ignore[no-untyped-def]
    pm = plugin_manager()
    assert (
        run(pm, "effect", "add", "sepia", "--lora", make_lora(), "--prompt", "apply a sepia tone").exit_code
        == 0
    )
    r = run(pm, "caption")
    assert r.exit_code == 0, r.output
    assert "sepia: the image with a sepia tone, sepia effect" in r.stdout
    again = run(pm, "caption")
    assert again.stdout == ""  # nothing missing any more
    r = run(pm, "caption", "--captioner", "nosuch")
    assert r.exit_code == 1 and "no captioner 'nosuch'" in r.stderr


def test_collections_fit_an_80_column_terminal(tiny_collection, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("COLUMNS", "80")
    r = run(tiny_collection, "collections")
    assert r.exit_code == 0 and "v1" in r.stdout and "2: invert, sepia" in r.stdout, r.output
    lines = r.stdout.splitlines()
    # a header, one line for the collection and the pointer to --json: nothing wraps (the file's long
    # path and the triggers are in --json)
    assert len(lines) == 3 and max(len(line) for line in lines) <= 80, r.stdout
