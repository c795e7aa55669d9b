"""Registry schema migrations and concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest
from helpers import add_bare_effect

from clora.errors import RegistryError
from clora.registry import Registry
from clora.registry.migrations import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION


def _tables(db: Path) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()


def test_blank_database_migrates(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    sqlite3.connect(db).close()  # an empty SQLite file, as some tools create
    Registry(db).close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert {"effects", "triggers", "collections", "collection_members", "runs", "settings"} <= _tables(db)


@pytest.mark.parametrize("old_version", range(1, SCHEMA_VERSION + 1))
def test_old_database_migrates_and_keeps_rows(tmp_path: Path, old_version: int) -> None:
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    for steps in MIGRATIONS[:old_version]:
        for step in steps:
            con.execute(step) if isinstance(step, str) else step(con, tmp_path)
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute(f"PRAGMA user_version = {old_version}")
    inside, outside = tmp_path / "loras" / "old.safetensors", "/elsewhere/other.safetensors"
    for name, trigger, path in (("old", "zorblax", str(inside)), ("other", "kuvimo", outside)):
        con.execute(
            "INSERT INTO effects (name, lora_path, lora_sha256, lora_size, lora_format, rank, alpha, "
            "target_modules, teacher_prompt, trigger, created_at, updated_at) VALUES "
            f"('{name}', '{path}', 'ab', 1, 'peft', 4, 4.0, '[]', 'p', '{trigger}', 't', 't')"
        )
    con.commit()
    con.close()
    with Registry(db) as reg:
        assert [(e.name, e.lora_path) for e in reg.list_effects()] == [
            ("old", str(inside)),
            ("other", outside),
        ]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # from schema 3 a path under the registry's folder is stored relative to it (the folder can move)
    stored = dict(con.execute("SELECT name, lora_path FROM effects").fetchall())
    assert stored == {"old": "loras/old.safetensors" if old_version < 3 else str(inside), "other": outside}
    con.close()


def test_missing_registry_is_not_created_for_reads(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no registry"):
        Registry(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


def _add_many(db: str, prefix: str, n: int, barrier) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    with Registry(db) as reg:
        for i in range(n):
            add_bare_effect(reg, f"{prefix}{i}")


def test_two_processes_adding_at_once(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    Registry(db).close()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_add_many, args=(str(db), p, 15, barrier)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with Registry(db) as reg:
        effects = reg.list_effects()
    assert len(effects) == 30
    assert len({e.trigger for e in effects}) == 30
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_reads_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with Registry(db) as reg:
        add_bare_effect(reg, "a")
        writer = sqlite3.connect(db, isolation_level=None, timeout=0)
        writer.execute("BEGIN IMMEDIATE")  # another process mid-write
        try:
            assert [e.name for e in reg.list_effects()] == ["a"]
        finally:
            writer.execute("ROLLBACK")
            writer.close()


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION + 1))
def test_a_registry_of_every_released_schema_migrates_and_reads(tmp_path: Path, version: int) -> None:
    """tests/fixtures/registry-vN.db: a registry as clora wrote it at schema N (the demo's ten effects and
    two collections, their configs in the flat form clora stored then)."""
    import json
    import shutil

    from helpers import plugin_manager, run

    from clora.distill.config import read_config

    db = tmp_path / "registry.db"
    shutil.copy(Path(__file__).parent / "fixtures" / f"registry-v{version}.db", db)
    pm = plugin_manager()
    effects = json.loads(run(pm, "--registry", db, "effect", "list", "--json").stdout)
    assert len(effects) == 10 and all(e["trigger"] for e in effects)
    collections = json.loads(run(pm, "--registry", db, "collections", "--json").stdout)
    assert [c["version"] for c in collections] == [1, 2] and collections[1]["parent_version"] == 1
    for c in collections:
        cfg = read_config(c["config"])
        assert cfg.steps == c["config"]["steps"] and cfg.student.rank == c["config"]["rank"]
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    bases = {b["name"] for b in json.loads(run(pm, "--registry", db, "base", "list", "--json").stdout)}
    assert ("qwen-edit" in bases) == (version >= 2)


def test_a_running_run_whose_process_is_gone_shows_as_interrupted(tmp_path: Path) -> None:
    from clora.runlock import RunBusyError, RunLock, holder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Registry(tmp_path / "r.db") as reg:
        lock = RunLock(run_dir, "r1")
        reg.create_run(run_id="r1", kind="full", config={}, total_steps=10, run_dir=str(run_dir))
        reg.update_run("r1", step=4)
        assert holder(run_dir) is not None and reg.get_run("r1").status == "running"  # type: ignore[union-attr]
        with pytest.raises(RunBusyError, match="run r1 is running now"):
            RunLock(run_dir, "r1")
        lock.release()  # what the kernel does when the process ends, however it ends
        assert holder(run_dir) is None
        [gone] = reg.list_runs()
        assert gone.status == "interrupted" and "ended at step 4" in (gone.message or "")
        assert "--resume --run r1" in (gone.message or "")
    with Registry(tmp_path / "r.db") as reg:  # and it was recorded
        assert reg.get_run("r1").status == "interrupted"  # type: ignore[union-attr]


def test_an_up_to_date_registry_opens_without_writing(tmp_path: Path) -> None:
    """Opening reads the schema version; only a migration writes, so a registry on a read-only mount (or
    one another process is writing) opens at once for reading."""
    db = tmp_path / "r.db"
    with Registry(db) as reg:
        add_bare_effect(reg, "a")
    writer = sqlite3.connect(db, isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        with Registry(db) as reg:
            assert [e.name for e in reg.list_effects()] == ["a"]
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_registry_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(
        RegistryError, match=r"cannot create the registry folder .*a part of the path is a file"
    ):
        Registry(a_file / "registry.db")
