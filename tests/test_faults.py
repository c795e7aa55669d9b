"""Faults a user meets, injected on purpose: a kill at the worst moment, a full disk, commands run while a
distill runs, and bad input. Each must leave a state clora can read and continue from, and say what
happened in one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from helpers import plugin_manager, run
from PIL import Image
from safetensors.torch import load_file, save_file

from clora import hookimpl
from clora.distill.loop import CHECKPOINT, Distiller
from clora.distill.losses import LossContext
from clora.registry import Registry
from clora.runlock import RunLock

#: a short run with both phases (anchoring, then on-policy with a critic) and two checkpoints
CONFIG = {
    "steps": 8,
    "checkpoint_every": 4,
    "batch_size": 2,
    "sources_per_effect": 8,
    "general_pool": 8,
    "teacher_steps": 4,
    "anchor_share": 0.5,
    "critic_warmup": 1,
    "block_len": 2,
}
_reference: dict[str, dict[str, torch.Tensor]] = {}


@pytest.fixture
def world(registry_file: Path):  # type: ignore[no-untyped-def]
    """The tiny toy base with teachers sepia and invert (built once per session), registered here."""
    pm = plugin_manager()
    for args in (["build-base", "--tiny"], ["teachers", "sepia", "invert", "--tiny"]):
        r = run(pm, "toy", *args)
        assert r.exit_code == 0, r.output
    return pm


def _config(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "distill.json"
    path.write_text(json.dumps({**CONFIG, **changes}))
    return path


def _uninterrupted(pm, tmp_path: Path) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The unified LoRA of CONFIG run straight through (the same in every test's registry: triggers and
    captions are allocated alike; computed once per session)."""
    if "tensors" not in _reference:
        r = run(
            pm, "distill", "--config", _config(tmp_path), "--no-progress", "--json", "--out", tmp_path / "ref"
        )
        assert r.exit_code == 0, r.output
        _reference["tensors"] = load_file(json.loads(r.stdout)["file"])
    return _reference["tensors"]


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _killed_distill(tmp_path: Path, args: list[object], kill_at: str) -> str:
    """Run `clora distill ARGS` in a child process that SIGKILLs itself at ``kill_at``; its stderr."""
    env = {**os.environ, "CLORA_TEST_KILL_AT": kill_at, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "clora", "distill", *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done.stderr


def _one_line_error(r, says: str) -> None:  # type: ignore[no-untyped-def]
    """Exit code 1 and one ``Error:`` line, the last one (a distill says what it starts before it)."""
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert [ln for ln in lines if ln.startswith("Error: ")] == lines[-1:], r.stderr
    assert says in lines[-1], r.stderr


def _dump(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


def _runs(registry_file: Path):  # type: ignore[no-untyped-def]
    with Registry(registry_file) as reg:
        return reg.list_runs(), reg.list_collections()


# ---- (a) a kill between writing a file and publishing it -----------------------------------------


def test_a_kill_before_a_rename_is_never_read_and_the_same_distill_continues(  # type: ignore[no-untyped-def]
    world, tmp_path: Path, registry_file: Path
) -> None:
    pm = world
    straight = _uninterrupted(pm, tmp_path)
    out = tmp_path / "out"
    args = ["--config", _config(tmp_path), "--no-progress", "--out", out]

    # killed with its second checkpoint (step 8) complete in a temp file, not yet renamed
    _killed_distill(tmp_path, args, f"*/{CHECKPOINT}@2")
    runs, collections = _runs(registry_file)
    killed = runs[-1]
    assert killed.status == "interrupted" and "ended at step 4" in (killed.message or "")
    assert "interrupted" in run(pm, "runs").stdout
    run_dir = Path(killed.run_dir)
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 4  # the old file, whole
    (leftover,) = run_dir.glob(f".{CHECKPOINT}.*.tmp")
    assert torch.load(leftover, weights_only=True)["step"] == 8

    # the same command again continues the run from step 4, and is killed before the collection's rename
    said = _killed_distill(tmp_path, args, f"{out}/*.safetensors")
    assert f"run {killed.id} of the same effects and settings stopped at step 4" in said, said
    assert f"resuming run {killed.id} at step 4" in said
    assert not leftover.exists()  # a continued run sweeps what a killed write left
    assert len(_runs(registry_file)[1]) == len(collections)
    assert not (out / f"{killed.id}.safetensors").exists() and list(out.glob(f".{killed.id}.*.tmp"))

    # and once more: nothing left to train; it writes the collection
    r = run(pm, "distill", *args, "--json")
    assert r.exit_code == 0, r.output
    assert "continuing it" in r.stderr
    col = json.loads(r.stdout)
    assert col["run_id"] == killed.id and not list(out.glob(".*.tmp"))
    _same_tensors(load_file(col["file"]), straight)
    assert [x.status for x in _runs(registry_file)[0]][-1] == "completed"


# ---- (b) a full disk part-way through a write ----------------------------------------------------


def _fills_the_disk(real, when):  # type: ignore[no-untyped-def]
    """``real(obj, path, ...)`` that, when ``when(path)``, writes half of the file and fails with ENOSPC."""

    def write(obj, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        real(obj, path, *args, **kwargs)
        if when(Path(path)):
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(  # type: ignore[no-untyped-def]
    world, tmp_path: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = world
    straight = _uninterrupted(pm, tmp_path)
    args = ["--config", _config(tmp_path), "--no-progress", "--out", tmp_path / "out"]
    seen: list[Path] = []

    def second_checkpoint(path: Path) -> bool:
        seen.append(path)
        return path.name.startswith(f".{CHECKPOINT}") and len(seen) == 2

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", _fills_the_disk(torch.save, second_checkpoint))
        r = run(pm, "distill", *args)
    _one_line_error(r, "No space left on device); the disk is full")
    assert CHECKPOINT in r.stderr
    failed = _runs(registry_file)[0][-1]
    assert failed.status == "failed" and "disk is full" in (failed.message or "")
    run_dir = Path(failed.run_dir)
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 4
    assert not list(run_dir.glob(".*.tmp"))

    # space freed: the same command continues from step 4
    r = run(pm, "distill", *args, "--json")
    assert r.exit_code == 0, r.output
    assert f"run {failed.id} of the same effects and settings stopped at step 4" in r.stderr
    _same_tensors(load_file(json.loads(r.stdout)["file"]), straight)


def test_a_full_disk_writing_the_collection_keeps_the_previous_one(  # type: ignore[no-untyped-def]
    world, tmp_path: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    pm = world
    out = tmp_path / "out"
    args = ["--config", _config(tmp_path, steps=4), "--no-progress", "--out", out]
    r = run(pm, "distill", *args, "--json")
    assert r.exit_code == 0, r.output
    v1 = Path(json.loads(r.stdout)["file"])
    v1_bytes = v1.read_bytes()
    with monkeypatch.context() as patch:
        full = _fills_the_disk(safetensors.torch.save_file, lambda p: p.parent == out)
        patch.setattr(safetensors.torch, "save_file", full)
        r = run(pm, "distill", *args, "--fresh")
    _one_line_error(r, "No space left on device); the disk is full")
    runs, collections = _runs(registry_file)
    assert [c.version for c in collections] == [1] and runs[-1].status == "failed"
    assert v1.read_bytes() == v1_bytes and sorted(out.iterdir()) == sorted([v1, v1.with_suffix(".state.pt")])

    r = run(pm, "distill", *args, "--json")  # continues the failed run: only the files are left to write
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == 2 and json.loads(r.stdout)["run_id"] == runs[-1].id


def test_a_full_disk_in_the_registry_changes_nothing(  # type: ignore[no-untyped-def]
    world, tmp_path: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import event

    pm = world
    out = tmp_path / "out"
    args = ["--config", _config(tmp_path, steps=4), "--no-progress", "--out", out]
    real = Registry._engine

    def full_for(table: str):  # type: ignore[no-untyped-def]
        def engine(self):  # type: ignore[no-untyped-def]
            e = real(self)

            @event.listens_for(e, "before_cursor_execute")
            def disk_full(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
                if statement.startswith(("INSERT", "UPDATE")) and f"INTO {table} " in statement:
                    raise sqlite3.OperationalError("database or disk is full")  # SQLite's SQLITE_FULL

            return e

        return engine

    before = _dump(registry_file)
    lora = json.loads(run(pm, "effect", "show", "sepia", "--json").stdout)["lora"]["path"]
    with monkeypatch.context() as patch:
        patch.setattr(Registry, "_engine", full_for("effects"))
        r = run(pm, "effect", "add", "more", "--lora", lora, "--prompt", "p")
    _one_line_error(r, "database or disk is full")
    assert _dump(registry_file) == before

    # the distill's last write, its collection row, fails: the run can be continued once there is room
    with monkeypatch.context() as patch:
        patch.setattr(Registry, "_engine", full_for("collections"))
        r = run(pm, "distill", *args)
    _one_line_error(r, "database or disk is full")
    runs, collections = _runs(registry_file)
    assert collections == [] and runs[-1].status == "failed"
    r = run(pm, "distill", *args, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["run_id"] == runs[-1].id


# ---- (c) the registry changes while a distill runs -----------------------------------------------


def test_commands_during_a_distill_do_not_change_its_plan(  # type: ignore[no-untyped-def]
    world, tmp_path: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = world
    before = {e["name"]: e for e in json.loads(run(pm, "effect", "list", "--json").stdout)}
    sepia, invert = before["sepia"], before["invert"]
    done: list[object] = []
    real_save = Distiller.save_checkpoint

    def save_then_change_the_registry(self: Distiller) -> None:
        real_save(self)
        if done:
            return
        done.append(run(pm, "effect", "update", "sepia", "--lora", invert["lora"]["path"]))
        done.append(run(pm, "effect", "remove", "invert"))  # the run holds it
        done.append(run(pm, "effect", "remove", "invert", "--force"))
        done.append(
            run(pm, "effect", "add", "extra", "--lora", sepia["lora"]["path"], "--prompt", "go extra")
        )

    with monkeypatch.context() as patch:
        patch.setattr(Distiller, "save_checkpoint", save_then_change_the_registry)
        r = run(pm, "distill", "--config", _config(tmp_path), "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    update, refused, retired, added = done
    assert update.exit_code == 0 and retired.exit_code == 0 and added.exit_code == 0, [x.output for x in done]  # type: ignore[attr-defined]
    assert refused.exit_code == 1 and "unfinished run" in refused.stderr and "--force" in refused.stderr  # type: ignore[attr-defined]

    # the collection is what the run planned: both effects, sepia's old teacher, the old triggers
    col = json.loads(r.stdout)
    assert {m["effect"]: m["trigger"] for m in col["members"]} == {
        "sepia": sepia["trigger"],
        "invert": invert["trigger"],
    }
    with Registry(registry_file) as reg:
        members = {m.effect_name: m for m in reg.require_collection(1).members}
    assert members["sepia"].teacher_sha256 == sepia["lora"]["sha256"]
    now = {e["name"]: e for e in json.loads(run(pm, "effect", "list", "--json").stdout)}
    assert now["invert"]["status"] == "retired" and now["sepia"]["lora"]["sha256"] == invert["lora"]["sha256"]

    # growing it replays the retired member, with its trigger
    r = run(pm, "distill", "--incremental", "--config", _config(tmp_path, steps=4), "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    grown = {m["effect"]: m["trigger"] for m in json.loads(r.stdout)["members"]}
    assert grown == {"sepia": sepia["trigger"], "invert": invert["trigger"], "extra": now["extra"]["trigger"]}
    # and adding it back restores that trigger
    r = run(
        pm, "effect", "add", "invert", "--lora", invert["lora"]["path"], "--prompt", "invert it", "--json"
    )
    assert r.exit_code == 0, r.output
    assert (
        json.loads(r.stdout)["trigger"] == invert["trigger"]
        and json.loads(r.stdout)["status"] == "registered"
    )


# ---- runs whose process ended badly --------------------------------------------------------------


def test_a_crashed_run_is_continued_or_started_over_on_purpose(  # type: ignore[no-untyped-def]
    world, tmp_path: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = world
    args = ["--config", _config(tmp_path), "--no-progress"]
    real_batch = Distiller.make_batch

    def out_of_memory_at_step_5(self, *a):  # type: ignore[no-untyped-def]
        if self.state.step == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_batch(self, *a)

    with monkeypatch.context() as patch:
        patch.setattr(Distiller, "make_batch", out_of_memory_at_step_5)
        r = run(pm, "distill", *args)
    _one_line_error(r, "out of memory on cpu")
    failed = _runs(registry_file)[0][-1]
    assert failed.status == "failed" and failed.step == 4

    # another process holding the run: continuing it is refused, naming that process
    with RunLock(failed.run_dir, failed.id):
        r = run(pm, "distill", *args)
        _one_line_error(r, f"run {failed.id} is running now (pid {os.getpid()}")
    # other settings: a new run, and a note on how to continue the old one
    r = run(pm, "distill", "--config", _config(tmp_path, steps=2), "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    assert f"note: run {failed.id}" in r.stderr and "steps 8 -> 2" in r.stderr
    assert f"--resume --run {failed.id}" in r.stderr
    # --fresh: a new run even though the failed one matches
    r = run(pm, "distill", *args, "--fresh", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["run_id"] != failed.id and "continuing" not in r.stderr
    assert _runs(registry_file)[0][0].status == "failed"


class NanFromTheStart:
    """A loss term that is NaN from its first call: the run stops before any checkpoint."""

    __name__ = "nan_from_the_start"
    loss_id = "nan_now"
    role = "generator"
    off_policy = True

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        return {"nan_now": torch.tensor(float("nan"))}

    @hookimpl
    def register_loss_terms(self, register):  # type: ignore[no-untyped-def]
        register(self)


def test_a_nan_before_the_first_checkpoint_claims_no_checkpoint(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm = plugin_manager(NanFromTheStart())
    cfg = _config(tmp_path, losses={"level_anchor": {}, "nan_now": {}})
    r = run(pm, "distill", "--config", cfg, "--no-progress")
    _one_line_error(r, "became nan at step 0, before the run's first checkpoint, so nothing was kept")
    assert "last good checkpoint" not in r.stderr


def test_written_files_get_the_usual_mode(tmp_path: Path) -> None:
    from clora.fileio import atomic_path, save_safetensors

    old = os.umask(0o027)
    try:
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("b")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640


# ---- (d) bad input: one line, exit code 1, the registry unchanged --------------------------------


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (400 M: PIL refuses it as a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_bad_input_is_one_line_and_changes_nothing(  # type: ignore[no-untyped-def]
    world, tmp_path: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = world
    r = run(pm, "distill", "--config", _config(tmp_path, steps=2), "--no-progress")
    assert r.exit_code == 0, r.output
    sepia = json.loads(run(pm, "effect", "show", "sepia", "--json").stdout)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(inputs / f"img{i}.png")
    img = inputs / "img0.png"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "photo.png").write_text("not an image")
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    bomb = _bomb_png(bombs / "bomb.png")
    long_name = tmp_path / "long"
    long_name.mkdir()
    Image.new("RGB", (16, 16)).save(long_name / ("x" * 250 + ".png"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_text("not an image")
    Image.new("RGB", (16, 16)).save(broken / "good.png")
    nan_lora = tmp_path / "nan.safetensors"
    tensors = load_file(sepia["lora"]["path"])
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(nan_lora))
    gen = ["generate", "--effect", "sepia", "--no-progress"]
    add = ["effect", "add", "new", "--prompt", "make it new", "--lora"]

    cases: list[tuple[list[object], str]] = [
        (
            ["--registry", a_file / "registry.db", "effect", "add", "x", "--lora", nan_lora, "--prompt", "p"],
            "a part of the path is a file, not a folder",
        ),
        ([*gen, "--image", inputs, "--out", a_file], f"--out {a_file} is a file, not a folder"),
        (
            [*gen, "--image", inputs, "--out", a_file / "out"],
            f"{a_file} (in --out {a_file / 'out'}) is a file",
        ),
        ([*gen, "--image", long_name, "--out", tmp_path / "o1"], "over this file system's limit of"),
        ([*gen, "--image", bomb, "--out", tmp_path / "o2"], "is too large to read safely"),
        ([*gen, "--image", empty], "no images (.bmp, .jpeg, .jpg, .png, .webp) in --image folder"),
        ([*gen, "--image", broken, "--out", tmp_path / "o3"], "cannot read image"),
        ([*gen, "--image", img, "--batch-size", "0"], "Invalid value for '--batch-size'"),
        ([*gen, "--image", img, "--steps", "-3"], "Invalid value for '--steps'"),
        ([*gen, "--image", img, "--steps", "0"], "Invalid value for '--steps'"),
        (["distill", "--steps", "0"], "Invalid value for '--steps'"),
        (
            [*add, sepia["lora"]["path"], "--examples", unreadable],
            "1 of 1 image(s) cannot be read: photo.png: not an image",
        ),
        ([*add, sepia["lora"]["path"], "--examples", bombs], "bomb.png: too large to read safely"),
        ([*add, nan_lora], f"tensor '{first}' holds NaN or infinite values (1 of"),
        (["effect", "update", "sepia", "--lora", nan_lora], "holds NaN"),
        (
            ["effect", "remove", "sepia"],
            "held by collection v1; `clora effect remove sepia --force` retires it",
        ),
        (["--registry", tmp_path / "none.db", "distill"], "no registry at"),
    ]
    before = _dump(registry_file)
    for args, says in cases:
        r = run(pm, *args)
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, (
            args,
            r.output,
        )
        assert says in r.stderr, (args, r.stderr)
        assert "examples folder" not in r.stderr or "--examples" in map(str, args)
    assert _dump(registry_file) == before
    assert not (tmp_path / "none.db").exists()
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # nothing made before the inputs read

    # a registry folder that cannot be made (a read-only mount), and an --out that cannot be written
    real_mkdir = Path.mkdir

    def read_only(self: Path, *a, **k) -> None:  # type: ignore[no-untyped-def]
        if self.name in ("ro", "unwritable"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    r = run(
        pm,
        "--registry",
        tmp_path / "ro" / "registry.db",
        "effect",
        "add",
        "x",
        "--lora",
        nan_lora,
        "--prompt",
        "p",
    )
    _one_line_error(r, "cannot create the registry folder")
    assert "read-only" in r.stderr
    r = run(pm, *gen, "--image", inputs, "--out", tmp_path / "unwritable")
    _one_line_error(r, "cannot create the --out folder")
    assert _dump(registry_file) == before


def test_a_workspace_moved_to_another_folder_keeps_working(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A registry with its teachers, examples and collections beside it stores those paths relative to
    its folder: moved elsewhere (another disk, another machine), effects, collections, generate and an
    incremental distill find their files at the new place."""
    import shutil

    with Registry(tmp_path / "registry.db") as scratch:  # where `world` registered the built teachers
        built = {e.name: e for e in scratch.list_effects()}
    ws = tmp_path / "ws"
    (ws / "teachers").mkdir(parents=True)
    (ws / "examples").mkdir()
    for name in ("sepia", "invert"):
        shutil.copy(built[name].lora_path, ws / "teachers" / f"{name}.safetensors")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(ws / "source.png")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(ws / "examples" / "a.png")
    pm = plugin_manager()
    cfg = _config(tmp_path, steps=4, anchor_share=1.0)

    def clora(*args: object):  # type: ignore[no-untyped-def]
        r = run(pm, "--registry", ws / "registry.db", *args)
        assert r.exit_code == 0, r.output
        return r

    def add(name: str, *more: object) -> None:
        prompt = built[name].teacher_prompt
        lora = ws / "teachers" / f"{name}.safetensors"
        clora("effect", "add", name, "--lora", lora, "--prompt", prompt, "--base", "toy-tiny", *more)

    add("sepia", "--examples", ws / "examples")
    clora("distill", "--config", cfg, "--no-progress")
    db = sqlite3.connect(ws / "registry.db")
    assert db.execute("SELECT lora_path, examples_dir FROM effects").fetchall() == [
        ("teachers/sepia.safetensors", "examples")
    ]
    assert db.execute("SELECT file FROM collections").fetchone()[0].startswith("collections/")
    db.close()

    old, ws = ws, tmp_path / "elsewhere" / "ws"
    ws.parent.mkdir()
    shutil.move(old, ws)
    [effect] = json.loads(clora("effect", "list", "--json").stdout)
    assert effect["lora"]["path"] == str(ws / "teachers" / "sepia.safetensors")
    assert effect["examples_dir"] == str(ws / "examples")
    [col] = json.loads(clora("collections", "--json").stdout)
    assert Path(col["file"]).parent == ws / "collections" and Path(col["file"]).is_file()
    out = tmp_path / "out.png"
    clora("generate", "--effect", "sepia", "--image", ws / "source.png", "--out", out, "--steps", "1")
    assert out.is_file()
    add("invert")
    clora("distill", "--incremental", "--config", cfg, "--no-progress")
    versions = json.loads(clora("collections", "--json").stdout)
    assert [c["parent_version"] for c in versions] == [None, 1]
    assert all(Path(c["file"]).is_file() for c in versions)
