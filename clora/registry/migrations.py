"""Schema migrations for the registry, tracked in SQLite's ``PRAGMA user_version``.

Each migration is a list of steps, each an SQL statement or a function of the connection and the
registry's folder; migration ``i`` (1-based) brings a database from
version ``i - 1`` to ``i``. Never edit a released migration: append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from clora.registry.paths import to_stored

Step = str | Callable[[sqlite3.Connection, Path], None]

#: the path columns, stored relative to the registry's folder from schema 3 on
PATH_COLUMNS = {
    "effects": ("id", ("lora_path", "examples_dir")),
    "collections": ("id", ("file",)),
    "runs": ("id", ("run_dir",)),
    "bases": ("name", ("path",)),
}


def _relative_paths(conn: sqlite3.Connection, folder: Path) -> None:
    """Store the absolute paths under the registry's folder relative to it (a workspace can move)."""
    for table, (key, columns) in PATH_COLUMNS.items():
        for column in columns:
            rows = conn.execute(f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL").fetchall()
            for row_key, value in rows:
                stored = to_stored(value, folder)
                if stored != value:
                    conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (stored, row_key))


#: ``PRAGMA application_id`` of a clora registry ("CLRA"), so another app's database is refused.
APPLICATION_ID = 0x434C5241

MIGRATIONS: list[list[Step]] = [
    # 1: effects, triggers, collections, runs, settings
    [
        """CREATE TABLE effects (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            lora_path TEXT NOT NULL,
            lora_sha256 TEXT NOT NULL,
            lora_size INTEGER NOT NULL,
            lora_format TEXT NOT NULL,
            rank INTEGER NOT NULL,
            alpha REAL NOT NULL,
            target_modules TEXT NOT NULL,
            base_id TEXT,
            teacher_prompt TEXT NOT NULL,
            trigger TEXT NOT NULL UNIQUE,
            caption TEXT,
            examples_dir TEXT,
            status TEXT NOT NULL DEFAULT 'registered',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        # Every trigger ever allocated; kept after an effect is removed so it is never reused.
        """CREATE TABLE triggers (
            trigger TEXT PRIMARY KEY,
            effect_name TEXT NOT NULL,
            allocated_at TEXT NOT NULL,
            retired_at TEXT
        )""",
        """CREATE TABLE collections (
            id INTEGER PRIMARY KEY,
            version INTEGER NOT NULL UNIQUE,
            file TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            parent_id INTEGER REFERENCES collections(id),
            base_id TEXT NOT NULL,
            run_id TEXT,
            config TEXT NOT NULL,
            metrics TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE collection_members (
            collection_id INTEGER NOT NULL REFERENCES collections(id),
            effect_name TEXT NOT NULL,
            trigger TEXT NOT NULL,
            caption TEXT NOT NULL,
            teacher_sha256 TEXT NOT NULL,
            PRIMARY KEY (collection_id, effect_name)
        )""",
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            config TEXT NOT NULL,
            status TEXT NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER NOT NULL,
            run_dir TEXT NOT NULL,
            collection_id INTEGER REFERENCES collections(id),
            message TEXT,
            started_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
    ],
    # 2: base models recorded from local folders (`clora base add`)
    [
        """CREATE TABLE bases (
            name TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            path TEXT NOT NULL,
            options TEXT NOT NULL DEFAULT '{}',
            fingerprint TEXT NOT NULL,
            info TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        )""",
    ],
    # 3: paths under the registry's folder become relative to it
    [_relative_paths],
]

SCHEMA_VERSION = len(MIGRATIONS)
