"""The effect registry: one SQLite file (``./registry.db`` by default) accessed through SQLAlchemy.

Every write runs in one ``BEGIN IMMEDIATE`` transaction, so two processes adding effects at the
same time serialise (the second waits up to ``busy_timeout``) and the file is never half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, literal_column, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ColumnElement

from clora import runlock
from clora.errors import DuplicateEffectError, RegistryError, TriggerError, UnknownEffectError, did_you_mean
from clora.fileio import os_error_message
from clora.registry.migrations import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from clora.registry.models import BaseModelRow, Collection, CollectionMember, Effect, Run, Setting, Trigger
from clora.registry.paths import WORKSPACE, workspace_of
from clora.triggers import allocate_trigger, collision, validate_trigger, words

__all__ = [
    "BaseModelRow",
    "Collection",
    "CollectionMember",
    "Effect",
    "Registry",
    "Run",
    "now",
]

_SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0
#: ``effects.status`` of a removed effect that a collection (or an unfinished run) holds: its row, trigger
#: and file record stay, so the collection can still be grown and the name re-added with its trigger
RETIRED = "retired"
_ELSEWHERE = "pass another file with --registry or CLORA_REGISTRY"
#: runs started in the same second keep the order they were recorded in
_RUN_ORDER: ColumnElement[int] = literal_column("runs.rowid")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise RegistryError(f"registry path {path} is a directory; pass a file with --registry")
    try:
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                magic = f.read(16)
            if magic != _SQLITE_MAGIC:
                raise RegistryError(f"{path} is not a clora registry (not an SQLite database); {_ELSEWHERE}")
    except OSError as e:
        raise RegistryError(f"{os_error_message('read the registry', path, e)}; {_ELSEWHERE}") from None


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to date inside one immediate transaction (a registry that is up to date is
    only read, so one on a read-only mount still serves the commands that read)."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == APPLICATION_ID and conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if app_id != APPLICATION_ID and (app_id != 0 or version != 0 or tables):
            raise RegistryError(
                f"{path} is an SQLite database but not a clora registry; "
                "pass another file with --registry or CLORA_REGISTRY"
            )
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"{path} was written by a newer clora (schema {version}, this clora knows {SCHEMA_VERSION}); "
                "upgrade clora (pip install -U clora)"
            )
        if version < SCHEMA_VERSION:
            for i in range(version, SCHEMA_VERSION):
                for step in MIGRATIONS[i]:
                    if isinstance(step, str):
                        conn.execute(step)
                    else:
                        step(conn, workspace_of(path))
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _planned_effects(run_dir: Path) -> set[str]:
    """The effect names in a run folder's ``plan.json`` (none if it cannot be read)."""
    try:
        plan = json.loads((run_dir / "plan.json").read_text())
        return {e["name"] for e in plan.get("effects", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _holders_text(versions: list[int], runs: list[str]) -> str:
    """``collection v1, v2 and unfinished run X``."""
    parts = []
    if versions:
        label = "collections " if len(versions) > 1 else "collection "
        parts.append(label + ", ".join(f"v{v}" for v in versions))
    if runs:
        parts.append(("unfinished runs " if len(runs) > 1 else "unfinished run ") + ", ".join(runs))
    return " and ".join(parts)


def _check_words_free(new_words: set[str], triggers: Iterable[str]) -> None:
    """A new prompt or caption may not use (part of) an allocated trigger: triggers never change."""
    for t in triggers:
        why = collision(t, [], new_words)
        if why:
            raise TriggerError(f"{why}; reword the prompt or caption")


class Registry:
    """A clora registry file. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        self.path = Path(path)
        #: the registry's folder: paths under it are stored relative to it (the workspace can move)
        self.workspace = workspace_of(self.path)
        _check_file(self.path)
        if not self.path.exists() and not create:
            raise RegistryError(f"no registry at {self.path}; add an effect first (`clora effect add`)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = os_error_message("create the registry folder", self.path.parent, e)
            raise RegistryError(f"{why}; {_ELSEWHERE}") from None
        try:
            raw = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise RegistryError(f"cannot open registry {self.path} ({e}); {_ELSEWHERE}") from None
        try:
            _migrate(raw, self.path)
        except sqlite3.OperationalError as e:  # cannot open, read-only, disk full, locked ...
            raise RegistryError(
                f"cannot open registry {self.path} ({e}); it (and its folder) must be writable, or "
                f"{_ELSEWHERE}"
            ) from None
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"{self.path} is not a usable clora registry ({e})") from None
        finally:
            raw.close()
        self.engine = self._engine()

    def _engine(self) -> Engine:
        engine = create_engine(
            f"sqlite:///{self.path}",
            poolclass=NullPool,
            connect_args={"timeout": BUSY_TIMEOUT_S},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let us issue BEGIN ourselves, so every transaction takes the write lock up front.
            dbapi_conn.isolation_level = None
            dbapi_conn.execute("PRAGMA foreign_keys = ON")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Writers take the lock up front (no upgrade deadlocks); readers do not block them.
            conn.exec_driver_sql(
                "BEGIN" if conn.get_execution_options().get("clora_read") else "BEGIN IMMEDIATE"
            )

        return engine

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error (``write=False``: read only)."""
        bind = self.engine if write else self.engine.execution_options(clora_read=True)
        token = WORKSPACE.set(self.workspace)
        try:
            with Session(bind, expire_on_commit=False) as s, s.begin():
                yield s
        except OperationalError as e:
            raise RegistryError(f"registry {self.path} is busy or unwritable ({e.orig})") from None
        except SADatabaseError as e:
            raise RegistryError(f"registry {self.path} failed: {e.orig}") from None
        finally:
            WORKSPACE.reset(token)

    # ---- effects -------------------------------------------------------------------------------

    def list_effects(self, retired: bool = False) -> list[Effect]:
        """The registered effects (with ``retired``: also the removed ones collections still hold)."""
        q = select(Effect).order_by(Effect.name)
        if not retired:
            q = q.where(Effect.status != RETIRED)
        with self.session(write=False) as s:
            return list(s.scalars(q))

    def get_effect(self, name: str) -> Effect:
        with self.session(write=False) as s:
            effect = s.scalar(select(Effect).where(Effect.name == name))
            if effect is None:
                names = list(s.scalars(select(Effect.name)))
                raise UnknownEffectError(self._unknown_effect_message(name, names))
            return effect

    def _unknown_effect_message(self, name: str, names: list[str]) -> str:
        return f"no effect '{name}' in {self.path}; {did_you_mean(name, names)}see `clora effect list`"

    def add_effect(self, *, trigger: str | None, **fields: Any) -> Effect:
        """Insert an effect, allocating (or validating) its trigger in the same transaction.

        A name a collection holds (a retired effect, or one removed before effects were retired) gets
        its old trigger back: the collections learned the effect under it."""
        with self.session() as s:
            name = fields["name"]
            old = s.scalar(select(Effect).where(Effect.name == name))
            if old is not None and old.status != RETIRED:
                raise DuplicateEffectError(
                    f"effect '{name}' already exists in {self.path}; remove it first "
                    f"(`clora effect remove {name}`) or pick another name"
                )
            taken = list(s.scalars(select(Trigger.trigger)))
            _check_words_free(words(fields["teacher_prompt"]) | words(fields.get("caption") or ""), taken)
            kept = old.trigger if old is not None else self._member_trigger(s, name)
            stamp = now()
            if kept is not None:
                if trigger not in (None, kept):
                    raise TriggerError(
                        f"effect '{name}' is in collection(s) under trigger '{kept}' and keeps it; "
                        "leave out --trigger"
                    )
                trigger = kept
            else:
                reserved = self._reserved_words(s) | words(fields["teacher_prompt"]) | words(name)
                if fields.get("caption"):
                    reserved |= words(fields["caption"])
                if trigger is None:
                    trigger = allocate_trigger(name, taken, reserved)
                else:
                    validate_trigger(trigger, taken, reserved)
            if old is not None:  # restore the retired row: new file and prompt, same trigger
                fields["caption"] = fields.get("caption") or old.caption
                fields.setdefault("status", "registered")
                for key, value in fields.items():
                    setattr(old, key, value)
                old.updated_at = stamp
                effect = old
            else:
                effect = Effect(trigger=trigger, created_at=stamp, updated_at=stamp, **fields)
                s.add(effect)
            row = s.get(Trigger, trigger)
            if row is None:
                s.add(Trigger(trigger=trigger, effect_name=name, allocated_at=stamp))
            else:
                row.effect_name, row.retired_at = name, None
            s.flush()
            return effect

    @staticmethod
    def _member_trigger(s: Session, name: str) -> str | None:
        """The trigger the latest collection holding effect ``name`` learned it under, if any does."""
        return s.scalar(
            select(CollectionMember.trigger)
            .where(CollectionMember.effect_name == name)
            .order_by(CollectionMember.collection_id.desc())
            .limit(1)
        )

    def holders(self, name: str) -> tuple[list[int], list[str]]:
        """What holds effect ``name``: the collection versions it is a member of, and the unfinished
        distill runs whose plan has it (their collection will)."""
        with self.session(write=False) as s:
            versions = list(
                s.scalars(
                    select(Collection.version)
                    .join(CollectionMember, CollectionMember.collection_id == Collection.id)
                    .where(CollectionMember.effect_name == name)
                    .order_by(Collection.version)
                )
            )
            runs = list(s.execute(select(Run.id, Run.run_dir).where(Run.status != "completed")))
        planned = [run_id for run_id, run_dir in runs if name in _planned_effects(Path(run_dir))]
        return versions, planned

    @staticmethod
    def _reserved_words(s: Session) -> set[str]:
        reserved: set[str] = set()
        for prompt, caption, name in s.execute(select(Effect.teacher_prompt, Effect.caption, Effect.name)):
            reserved |= words(prompt) | words(caption or "") | words(name)
        return reserved

    def set_caption(self, name: str, caption: str) -> Effect:
        """Set an effect's student caption (its words must not overlap any trigger)."""
        with self.session() as s:
            effect = s.scalar(select(Effect).where(Effect.name == name))
            if effect is None:
                raise UnknownEffectError(self._unknown_effect_message(name, []))
            _check_words_free(words(caption), s.scalars(select(Trigger.trigger)))
            effect.caption = caption
            effect.updated_at = now()
            return effect

    def replace_lora(self, name: str, **fields: Any) -> Effect:
        """Point effect ``name`` at a new LoRA file (``lora_*``, rank, alpha, target modules, base, status).

        The trigger, prompt and caption stay; collections made from the old file keep its sha256 in
        their member rows, so an incremental run can tell the effect changed.
        """
        allowed = {
            "lora_path",
            "lora_sha256",
            "lora_size",
            "lora_format",
            "rank",
            "alpha",
            "target_modules_json",
            "base_id",
            "status",
        }
        if set(fields) - allowed:
            raise ValueError(f"not LoRA fields: {sorted(set(fields) - allowed)}")
        with self.session() as s:
            effect = s.scalar(select(Effect).where(Effect.name == name))
            if effect is None:
                names = list(s.scalars(select(Effect.name)))
                raise UnknownEffectError(self._unknown_effect_message(name, names))
            for key, value in fields.items():
                setattr(effect, key, value)
            effect.updated_at = now()
            return effect

    def remove_effect(self, name: str, force: bool = False) -> bool:
        """Delete an effect, or retire it (``force``) when a collection or an unfinished run holds it;
        True when retired. Its trigger stays reserved forever."""
        versions, planned = self.holders(name)
        held = bool(versions or planned)
        with self.session() as s:
            effect = s.scalar(select(Effect).where(Effect.name == name))
            if effect is None:
                names = list(s.scalars(select(Effect.name).where(Effect.status != RETIRED)))
                raise UnknownEffectError(self._unknown_effect_message(name, names))
            if effect.status == RETIRED:
                raise RegistryError(
                    f"effect '{name}' is already removed (retired: {_holders_text(versions, planned)} "
                    "hold it); `clora effect add` brings it back with its trigger"
                )
            if held and not force:
                raise RegistryError(
                    f"effect '{name}' is held by {_holders_text(versions, planned)}; "
                    f"`clora effect remove {name} --force` retires it (its trigger and file record stay, "
                    "so those collections can still be grown; `clora effect add` brings it back)"
                )
            trig = s.get(Trigger, effect.trigger)
            if trig is not None:
                trig.retired_at = now()
            if held:
                effect.status, effect.updated_at = RETIRED, now()
            else:
                s.delete(effect)
            return held

    # ---- bases ---------------------------------------------------------------------------------

    def list_bases(self) -> list[BaseModelRow]:
        with self.session(write=False) as s:
            return list(s.scalars(select(BaseModelRow).order_by(BaseModelRow.name)))

    def get_base(self, name: str) -> BaseModelRow | None:
        with self.session(write=False) as s:
            return s.get(BaseModelRow, name)

    def add_base(
        self,
        *,
        name: str,
        kind: str,
        path: str,
        options: dict[str, str],
        fingerprint: str,
        info: dict[str, Any],
        replace: bool = False,
    ) -> BaseModelRow:
        """Record a base model folder under ``name`` (``replace``: overwrite an existing record)."""
        with self.session() as s:
            row = s.get(BaseModelRow, name)
            if row is not None and not replace:
                raise RegistryError(
                    f"base '{name}' already exists in {self.path} (at {row.path}); pass --force to "
                    "replace it or pick another name"
                )
            if row is None:
                row = BaseModelRow(name=name, created_at=now())
                s.add(row)
            row.kind, row.path, row.fingerprint = kind, path, fingerprint
            row.options_json = json.dumps(options, sort_keys=True)
            row.info_json = json.dumps(info, sort_keys=True)
            s.flush()
            return row

    def remove_base(self, name: str) -> None:
        """Forget a recorded base (its folder is not touched); refused while effects are bound to it."""
        with self.session() as s:
            row = s.get(BaseModelRow, name)
            if row is None:
                raise RegistryError(f"no base '{name}' in {self.path}; see `clora base list`")
            bound = list(s.execute(select(Effect.name, Effect.status).where(Effect.base_id == name)))
            active = [n for n, status in bound if status != RETIRED]
            names = active or [n for n, _ in bound]
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            if active:
                raise RegistryError(
                    f"effects {', '.join(names[:3])}{more} are bound to base '{name}'; remove them first"
                )
            if bound:
                raise RegistryError(
                    f"removed effects {', '.join(names[:3])}{more} that collections hold are bound to base "
                    f"'{name}'; those collections still need it"
                )
            s.delete(row)

    # ---- settings ------------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        with self.session(write=False) as s:
            row = s.get(Setting, key)
            return row.value if row else None

    def set_setting(self, key: str, value: str) -> None:
        with self.session() as s:
            row = s.get(Setting, key)
            if row is None:
                s.add(Setting(key=key, value=value))
            else:
                row.value = value

    # ---- collections ---------------------------------------------------------------------------

    def list_collections(self) -> list[Collection]:
        with self.session(write=False) as s:
            rows = list(s.scalars(select(Collection).order_by(Collection.version)))
            for c in rows:
                _ = c.members  # load before the session closes
            return rows

    def get_collection(self, version: int | None = None) -> Collection | None:
        """Collection ``version``, or the latest when None; None if there is none."""
        with self.session(write=False) as s:
            q = select(Collection)
            q = (
                q.where(Collection.version == version)
                if version is not None
                else q.order_by(Collection.version.desc())
            )
            c = s.scalars(q.limit(1)).first()
            if c is not None:
                _ = c.members
            return c

    def require_collection(self, version: int | None = None) -> Collection:
        """Like :meth:`get_collection`, but a missing collection is an error with a next step."""
        c = self.get_collection(version)
        if c is None:
            raise RegistryError(
                f"no collection v{version}; see `clora collections`"
                if version is not None
                else "no collection yet; run `clora distill` first"
            )
        return c

    def collection_version(self, collection_id: int | None) -> int | None:
        if collection_id is None:
            return None
        with self.session(write=False) as s:
            c = s.get(Collection, collection_id)
            return c.version if c else None

    def add_collection(
        self,
        *,
        file: str,
        sha256: str,
        parent_id: int | None,
        base_id: str,
        run_id: str | None,
        config: dict[str, Any],
        metrics: dict[str, Any],
        members: list[dict[str, str]],
    ) -> Collection:
        """Record a new immutable collection version (next number) with its members."""
        with self.session() as s:
            last = s.scalar(select(Collection.version).order_by(Collection.version.desc()).limit(1))
            c = Collection(
                version=(last or 0) + 1,
                file=file,
                sha256=sha256,
                parent_id=parent_id,
                base_id=base_id,
                run_id=run_id,
                config_json=json.dumps(config, sort_keys=True),
                metrics_json=json.dumps(metrics, sort_keys=True),
                created_at=now(),
            )
            s.add(c)
            s.flush()
            for m in members:
                s.add(CollectionMember(collection_id=c.id, **m))
            s.flush()
            _ = c.members
            return c

    def update_collection_metrics(self, version: int, metrics: dict[str, Any]) -> None:
        with self.session() as s:
            c = s.scalar(select(Collection).where(Collection.version == version))
            if c is None:
                raise RegistryError(f"no collection v{version}; see `clora collections`")
            merged = json.loads(c.metrics_json) | metrics
            c.metrics_json = json.dumps(merged, sort_keys=True)

    # ---- runs ----------------------------------------------------------------------------------

    def create_run(
        self, *, run_id: str, kind: str, config: dict[str, Any], total_steps: int, run_dir: str
    ) -> Run:
        with self.session() as s:
            stamp = now()
            run = Run(
                id=run_id,
                kind=kind,
                config_json=json.dumps(config, sort_keys=True),
                status="running",
                step=0,
                total_steps=total_steps,
                run_dir=run_dir,
                started_at=stamp,
                updated_at=stamp,
            )
            s.add(run)
            return run

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise RegistryError(f"no run '{run_id}' in {self.path}")
            for k, v in fields.items():
                setattr(run, k, v)
            run.updated_at = now()

    def get_run(self, run_id: str | None = None, *, unfinished: bool = False) -> Run | None:
        """Run ``run_id``, or the most recent run (that has not completed, with ``unfinished``)."""
        with self.session(write=False) as s:
            if run_id is not None:
                run = s.get(Run, run_id)
            else:
                q = select(Run)
                if unfinished:
                    q = q.where(Run.status != "completed")
                run = s.scalars(q.order_by(Run.started_at.desc(), _RUN_ORDER.desc()).limit(1)).first()
        if run is not None:
            self._settle([run])
        return run

    def list_runs(self) -> list[Run]:
        """Every run, oldest first (a "running" one whose process is gone shows as interrupted)."""
        with self.session(write=False) as s:
            runs = list(s.scalars(select(Run).order_by(Run.started_at, _RUN_ORDER)))
        self._settle(runs)
        return runs

    def _settle(self, runs: list[Run]) -> None:
        """Mark "running" runs whose process is gone (their run lock is free) as interrupted."""
        for run in runs:
            if run.status != "running" or runlock.holder(run.run_dir) is not None:
                continue
            who = runlock.last_holder(run.run_dir)
            process = f"pid {who.get('pid', '?')} on {who.get('host', '?')}" if who else "unknown"
            message = (
                f"its process ({process}) ended at step {run.step}; `clora distill --resume --run {run.id}` "
                "(or the same `clora distill` again) continues it"
            )
            gone = True
            # a read-only registry: say it, do not record it
            with contextlib.suppress(RegistryError), self.session() as s:
                row = s.get(Run, run.id)
                # looked at again under the write lock: a resume may have taken the run meanwhile
                gone = row is not None and row.status == "running" and runlock.holder(run.run_dir) is None
                if row is not None and gone:
                    row.status, row.message, row.updated_at = "interrupted", message, now()
            if gone:
                run.status, run.message = "interrupted", message
