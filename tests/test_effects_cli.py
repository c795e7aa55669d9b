"""`clora effect add/list/show/remove` and `clora base`: the happy paths and every bad input."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import ShapesOnlyPlugin
from helpers import file_digest, plugin_manager, run
from safetensors.torch import save_file


@pytest.fixture
def pm():  # type: ignore[no-untyped-def]
    return plugin_manager(ShapesOnlyPlugin())


def effects_json(pm) -> list[dict]:  # type: ignore[no-untyped-def]
    result = run(pm, "effect", "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_add_list_show_remove(pm, make_lora, registry_file: Path) -> None:  # type: ignore[no-untyped-def]
    lora = make_lora("sepia", "diffusers", rank=4)
    result = run(
        pm,
        "effect",
        "add",
        "sepia",
        "--lora",
        lora,
        "--prompt",
        "apply a sepia tone",
        "--base",
        "shapes-only",
    )
    assert result.exit_code == 0, result.output
    assert "added effect 'sepia'" in result.stdout
    assert registry_file.exists()

    [effect] = effects_json(pm)
    assert effect["name"] == "sepia"
    assert effect["base"] == "shapes-only"
    assert effect["status"] == "registered"
    assert effect["teacher_prompt"] == "apply a sepia tone"
    assert effect["lora"]["format"] == "diffusers"
    assert effect["lora"]["rank"] == 4
    assert effect["lora"]["alpha"] == 4.0
    assert len(effect["lora"]["sha256"]) == 64
    assert effect["lora"]["size"] == lora.stat().st_size
    assert all(m.endswith(("to_q", "to_k", "to_v", "to_out.0")) for m in effect["lora"]["target_modules"])
    trigger = effect["trigger"]
    assert trigger and trigger not in "apply a sepia tone"

    shown = run(pm, "effect", "show", "sepia", "--json")
    assert json.loads(shown.stdout) == effect
    assert "trigger" in run(pm, "effect", "show", "sepia").stdout

    table = run(pm, "effect", "list")
    assert "sepia" in table.stdout and trigger in table.stdout

    removed = run(pm, "effect", "remove", "sepia")
    assert removed.exit_code == 0
    assert effects_json(pm) == []


def test_json_shape_is_stable(pm, make_lora) -> None:  # type: ignore[no-untyped-def]
    run(pm, "effect", "add", "x1", "--lora", make_lora(), "--prompt", "do it")
    [effect] = effects_json(pm)
    assert sorted(effect) == sorted(
        [
            "name",
            "trigger",
            "teacher_prompt",
            "caption",
            "base",
            "status",
            "lora",
            "examples_dir",
            "created_at",
            "updated_at",
        ]
    )
    assert sorted(effect["lora"]) == sorted(
        ["path", "sha256", "size", "format", "rank", "alpha", "target_modules"]
    )


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_each_format_is_recognised(pm, make_lora, fmt: str) -> None:  # type: ignore[no-untyped-def]
    result = run(
        pm,
        "effect",
        "add",
        "e",
        "--lora",
        make_lora("e", fmt, rank=8),
        "--prompt",
        "p q",
        "--base",
        "shapes-only",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["lora"]["format"] == fmt
    assert data["lora"]["rank"] == 8
    # kohya's flattened names are resolved back to the base's module names
    assert all("." in m for m in data["lora"]["target_modules"])


def test_unbound_without_base_then_default_base(pm, make_lora) -> None:  # type: ignore[no-untyped-def]
    r = run(pm, "effect", "add", "a1", "--lora", make_lora("a"), "--prompt", "first one")
    assert r.exit_code == 0 and "unbound" in r.stdout
    assert run(pm, "base", "use", "shapes-only").exit_code == 0
    bases = json.loads(run(pm, "base", "list", "--json").stdout)
    assert [b["name"] for b in bases if b["default"]] == ["shapes-only"]
    r = run(pm, "effect", "add", "b1", "--lora", make_lora("b"), "--prompt", "second one")
    assert r.exit_code == 0, r.output
    by_name = {e["name"]: e for e in effects_json(pm)}
    assert by_name["a1"]["base"] is None and by_name["a1"]["status"] == "unbound"
    assert by_name["b1"]["base"] == "shapes-only" and by_name["b1"]["status"] == "registered"


def test_explicit_trigger_kept(pm, make_lora) -> None:  # type: ignore[no-untyped-def]
    r = run(
        pm, "effect", "add", "e", "--lora", make_lora(), "--prompt", "p", "--trigger", "zorblax", "--json"
    )
    assert json.loads(r.stdout)["trigger"] == "zorblax"


def test_examples_folder(pm, make_lora, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    ex = tmp_path / "ex"
    ex.mkdir()
    Image.new("RGB", (8, 8)).save(ex / "a.png")
    r = run(pm, "effect", "add", "e", "--lora", make_lora(), "--prompt", "p", "--examples", ex, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["examples_dir"] == str(ex.resolve())


# ---- bad input: one line, non-zero exit, registry unchanged -------------------------------------


def _bad_files(tmp_path: Path, make_lora, shapes_factory) -> dict[str, tuple[Path, str]]:  # type: ignore[no-untyped-def]
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a tensor file\n")
    good = make_lora("good")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    no_lora = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(no_lora))
    shapes = {
        k.replace("transformer_blocks", "blocks_that_do_not_exist"): v
        for k, v in shapes_factory.module_shapes().items()
    }
    wrong_modules = make_lora("wrongmods", shapes=shapes)
    wrong_shapes = make_lora(
        "wrongshapes", shapes={k: (i + 1, o) for k, (i, o) in shapes_factory.module_shapes().items()}
    )
    return {
        "missing": (tmp_path / "nope.safetensors", "not found"),
        "not safetensors": (text, "not a readable safetensors file"),
        "truncated": (truncated, "not a readable safetensors file"),
        "no lora tensors": (no_lora, "no LoRA tensors"),
        "wrong modules": (wrong_modules, "does not have"),
        "wrong shapes": (wrong_shapes, "needs in="),
    }


@pytest.mark.parametrize(
    "case", ["missing", "not safetensors", "truncated", "no lora tensors", "wrong modules", "wrong shapes"]
)
def test_bad_lora_file(pm, make_lora, shapes_factory, tmp_path, registry_file, case) -> None:  # type: ignore[no-untyped-def]
    run(pm, "effect", "add", "keep", "--lora", make_lora("keep"), "--prompt", "kept")
    before = file_digest(registry_file)
    path, message = _bad_files(tmp_path, make_lora, shapes_factory)[case]
    r = run(pm, "effect", "add", "new", "--lora", path, "--prompt", "p", "--base", "shapes-only")
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ")
    assert message in r.stderr
    assert file_digest(registry_file) == before
    assert [e["name"] for e in effects_json(pm)] == ["keep"]


@pytest.mark.parametrize("name", ["", "a/b", "..", "../x", "a\\b", "x" * 65, "-lead", "sp ace", "a..b"])
def test_unsafe_names(pm, make_lora, registry_file, name: str) -> None:  # type: ignore[no-untyped-def]
    r = run(pm, "effect", "add", name, "--lora", make_lora(), "--prompt", "p")
    assert r.exit_code != 0
    assert "invalid effect name" in r.stderr or "Error" in r.stderr
    assert not registry_file.exists() or effects_json(pm) == []


def test_duplicate_name_and_trigger(pm, make_lora, registry_file) -> None:  # type: ignore[no-untyped-def]
    assert (
        run(
            pm, "effect", "add", "a", "--lora", make_lora(), "--prompt", "p", "--trigger", "zorblax"
        ).exit_code
        == 0
    )
    before = file_digest(registry_file)
    r = run(pm, "effect", "add", "a", "--lora", make_lora(), "--prompt", "p")
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = run(pm, "effect", "add", "b", "--lora", make_lora(), "--prompt", "p", "--trigger", "zorblax")
    assert r.exit_code == 1 and "already allocated" in r.stderr
    r = run(pm, "effect", "add", "c", "--lora", make_lora(), "--prompt", "p", "--trigger", "zorblaxx")
    assert r.exit_code == 1 and "overlaps trigger 'zorblax'" in r.stderr
    r = run(pm, "effect", "add", "d", "--lora", make_lora(), "--prompt", "make it zorblax style")
    assert r.exit_code == 1 and "reword the prompt" in r.stderr
    assert file_digest(registry_file) == before


def test_trigger_never_reused_after_remove(pm, make_lora) -> None:  # type: ignore[no-untyped-def]
    run(pm, "effect", "add", "a", "--lora", make_lora(), "--prompt", "p", "--trigger", "zorblax")
    run(pm, "effect", "remove", "a")
    r = run(pm, "effect", "add", "b", "--lora", make_lora(), "--prompt", "p", "--trigger", "zorblax")
    assert r.exit_code == 1 and "already allocated" in r.stderr


def test_unknown_base_and_unknown_effect(pm, make_lora) -> None:  # type: ignore[no-untyped-def]
    r = run(pm, "effect", "add", "a", "--lora", make_lora(), "--prompt", "p", "--base", "nosuch")
    assert r.exit_code == 1 and "no base 'nosuch'" in r.stderr and "shapes-only" in r.stderr
    run(pm, "effect", "add", "sepia", "--lora", make_lora(), "--prompt", "p")
    r = run(pm, "effect", "show", "sepai")
    assert r.exit_code == 1 and "did you mean 'sepia'" in r.stderr
    assert run(pm, "effect", "remove", "nosuch").exit_code == 1


def test_registry_not_clora(pm, make_lora, registry_file) -> None:  # type: ignore[no-untyped-def]
    registry_file.write_bytes(b"hello, I am a text file" * 10)
    before = file_digest(registry_file)
    r = run(pm, "effect", "add", "a", "--lora", make_lora(), "--prompt", "p")
    assert r.exit_code == 1 and "not a clora registry" in r.stderr
    assert file_digest(registry_file) == before

    registry_file.unlink()
    con = sqlite3.connect(registry_file)
    con.execute("CREATE TABLE other_app (x)")
    con.commit()
    con.close()
    before = file_digest(registry_file)
    r = run(pm, "effect", "list")
    assert r.exit_code == 1 and "not a clora registry" in r.stderr
    assert file_digest(registry_file) == before


def test_registry_newer_than_code(pm, make_lora, registry_file) -> None:  # type: ignore[no-untyped-def]
    from clora.registry.migrations import SCHEMA_VERSION

    run(pm, "effect", "add", "a", "--lora", make_lora(), "--prompt", "p")
    con = sqlite3.connect(registry_file)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    before = file_digest(registry_file)
    r = run(pm, "effect", "list")
    assert r.exit_code == 1 and "newer clora" in r.stderr
    assert file_digest(registry_file) == before


def test_list_without_registry_creates_nothing(pm, registry_file) -> None:  # type: ignore[no-untyped-def]
    r = run(pm, "effect", "list")
    assert r.exit_code == 0 and "no effects" in r.stdout
    assert not registry_file.exists()


def test_registry_option_overrides_env(pm, make_lora, tmp_path, registry_file) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "other.db"
    assert (
        run(pm, "--registry", other, "effect", "add", "a", "--lora", make_lora(), "--prompt", "p").exit_code
        == 0
    )
    assert other.exists() and not registry_file.exists()


def test_every_command_has_help(pm) -> None:  # type: ignore[no-untyped-def]
    for args in (
        ["--help"],
        ["effect", "add", "--help"],
        ["effect", "list", "--help"],
        ["effect", "show", "--help"],
        ["effect", "remove", "--help"],
        ["plugins", "--help"],
        ["base", "use", "--help"],
        ["base", "list", "--help"],
    ):
        r = run(pm, *args)
        assert r.exit_code == 0, args
        assert "Usage" in r.stdout


def test_update_points_at_a_new_file_and_keeps_the_trigger(pm, make_lora, registry_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    old = make_lora("sepia", rank=4)
    r = run(
        pm,
        "effect",
        "add",
        "sepia",
        "--lora",
        old,
        "--prompt",
        "apply sepia",
        "--base",
        "shapes-only",
        "--json",
    )
    before = json.loads(r.stdout)
    new = make_lora("sepia-v2", fmt="kohya", rank=8, seed=3)
    r = run(pm, "effect", "update", "sepia", "--lora", new, "--json")
    assert r.exit_code == 0, r.output
    after = json.loads(r.stdout)
    assert after["trigger"] == before["trigger"] and after["teacher_prompt"] == "apply sepia"
    assert after["lora"]["path"] == str(new.resolve()) and after["lora"]["rank"] == 8
    assert after["lora"]["format"] == "kohya" and after["lora"]["sha256"] != before["lora"]["sha256"]
    # bad input: one line, exit 1, registry untouched
    digest = file_digest(registry_file)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for args in (
        ["sepia", "--lora", bad],
        ["sepai", "--lora", new],
        ["sepia", "--lora", tmp_path / "missing"],
    ):
        r = run(pm, "effect", "update", *args)
        assert r.exit_code == 1 and r.output.startswith("Error:") and r.output.count("\n") == 1, r.output
    assert "did you mean 'sepia'" in run(pm, "effect", "update", "sepai", "--lora", new).output
    assert file_digest(registry_file) == digest


def test_removing_a_collection_member_retires_it_and_adding_it_back_restores_its_trigger(  # type: ignore[no-untyped-def]
    pm, make_lora, registry_file
) -> None:
    from clora.registry import Registry

    lora = make_lora("sepia")
    for name in ("sepia", "warm", "loose"):
        r = run(
            pm, "effect", "add", name, "--lora", lora, "--prompt", f"make it {name}", "--base", "shapes-only"
        )
        assert r.exit_code == 0, r.output
    before = {e["name"]: e for e in effects_json(pm)}
    with Registry(registry_file) as reg:
        reg.add_collection(
            file="v1.safetensors",
            sha256="0" * 64,
            parent_id=None,
            base_id="shapes-only",
            run_id=None,
            config={},
            metrics={},
            members=[
                {
                    "effect_name": n,
                    "trigger": before[n]["trigger"],
                    "caption": "c",
                    "teacher_sha256": "0" * 64,
                }
                for n in ("sepia", "warm")
            ],
        )
    digest = file_digest(registry_file)
    r = run(pm, "effect", "remove", "sepia")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "held by collection v1" in r.stderr and "--force" in r.stderr
    assert file_digest(registry_file) == digest
    assert run(pm, "effect", "remove", "loose").exit_code == 0  # in no collection: deleted

    r = run(pm, "effect", "remove", "sepia", "--force")
    assert r.exit_code == 0 and "retired" in r.stdout
    listed = {e["name"]: e for e in effects_json(pm)}
    assert set(listed) == {"sepia", "warm"} and listed["sepia"]["status"] == "retired"
    assert listed["sepia"]["trigger"] == before["sepia"]["trigger"]
    with Registry(registry_file) as reg:
        assert [e.name for e in reg.list_effects()] == ["warm"]  # what a distill of "all" takes
    for args, says in (
        (["effect", "remove", "sepia"], "already removed"),
        (["effect", "update", "sepia", "--lora", lora], "add it back"),
        (["effect", "add", "sepia", "--lora", lora, "--prompt", "p", "--trigger", "zorblax"], "keeps it"),
    ):
        r = run(pm, *args)
        assert r.exit_code == 1 and says in r.stderr and r.stderr.count("\n") == 1, (args, r.output)

    # back with its trigger and base, a new file and prompt
    new = make_lora("sepia2", seed=4)
    r = run(pm, "effect", "add", "sepia", "--lora", new, "--prompt", "apply sepia", "--json")
    assert r.exit_code == 0, r.output
    back = json.loads(r.stdout)
    assert back["trigger"] == before["sepia"]["trigger"] and back["status"] == "registered"
    assert back["base"] == "shapes-only" and back["teacher_prompt"] == "apply sepia"

    # a member deleted by an older clora (no row left) also gets its trigger back
    con = sqlite3.connect(registry_file)
    con.execute("DELETE FROM effects WHERE name = 'warm'")
    con.commit()
    con.close()
    r = run(pm, "effect", "add", "warm", "--lora", lora, "--prompt", "warmer", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["trigger"] == before["warm"]["trigger"]


def test_examples_are_opened_when_added(pm, make_lora, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    ex = tmp_path / "ex"
    ex.mkdir()
    (ex / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    r = run(pm, "effect", "add", "e", "--lora", make_lora(), "--prompt", "p", "--examples", ex)
    assert r.exit_code == 1 and "1 of 1 image(s) cannot be read: broken.png" in r.stderr
    (ex / "broken.png").unlink()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(ex / f"{i}.png")
    r = run(pm, "effect", "add", "e", "--lora", make_lora(), "--prompt", "p", "--examples", ex)
    assert r.exit_code == 0 and "3 example image(s)" in r.stdout
