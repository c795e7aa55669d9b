"""ORM mappings of the registry tables (the schema itself lives in ``migrations.py``)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import ForeignKey, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from clora.registry.paths import WORKSPACE, from_stored, to_stored


class WorkspacePath(TypeDecorator[str]):
    """A file or folder path: stored relative to the registry's folder when under it, read back absolute."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        root = WORKSPACE.get()
        return value if value is None or root is None else to_stored(value, root)

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        root = WORKSPACE.get()
        return value if value is None or root is None else from_stored(value, root)


class Base(DeclarativeBase):
    pass


class Effect(Base):
    __tablename__ = "effects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    lora_path: Mapped[str] = mapped_column(WorkspacePath)
    lora_sha256: Mapped[str]
    lora_size: Mapped[int]
    lora_format: Mapped[str]
    rank: Mapped[int]
    alpha: Mapped[float]
    target_modules_json: Mapped[str] = mapped_column("target_modules", Text)
    base_id: Mapped[str | None]
    teacher_prompt: Mapped[str]
    trigger: Mapped[str] = mapped_column(unique=True)
    caption: Mapped[str | None]
    examples_dir: Mapped[str | None] = mapped_column(WorkspacePath)
    status: Mapped[str] = mapped_column(default="registered")
    created_at: Mapped[str]
    updated_at: Mapped[str]

    @property
    def target_modules(self) -> list[str]:
        return list(json.loads(self.target_modules_json))

    def to_dict(self) -> dict[str, Any]:
        """The documented ``clora effect show --json`` shape."""
        return {
            "name": self.name,
            "trigger": self.trigger,
            "teacher_prompt": self.teacher_prompt,
            "caption": self.caption,
            "base": self.base_id,
            "status": self.status,
            "lora": {
                "path": self.lora_path,
                "sha256": self.lora_sha256,
                "size": self.lora_size,
                "format": self.lora_format,
                "rank": self.rank,
                "alpha": self.alpha,
                "target_modules": self.target_modules,
            },
            "examples_dir": self.examples_dir,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


class Trigger(Base):
    __tablename__ = "triggers"

    trigger: Mapped[str] = mapped_column(primary_key=True)
    effect_name: Mapped[str]
    allocated_at: Mapped[str]
    retired_at: Mapped[str | None]


class Collection(Base):
    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(unique=True)
    file: Mapped[str] = mapped_column(WorkspacePath)
    sha256: Mapped[str]
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("collections.id"))
    base_id: Mapped[str]
    run_id: Mapped[str | None]
    config_json: Mapped[str] = mapped_column("config", Text)
    metrics_json: Mapped[str] = mapped_column("metrics", Text, default="{}")
    created_at: Mapped[str]

    members: Mapped[list[CollectionMember]] = relationship(
        back_populates="collection", order_by="CollectionMember.effect_name"
    )

    def to_dict(self, parent_version: int | None = None) -> dict[str, Any]:
        return {
            "version": self.version,
            "file": self.file,
            "sha256": self.sha256,
            "parent_version": parent_version,
            "base": self.base_id,
            "run_id": self.run_id,
            "members": [
                {"effect": m.effect_name, "trigger": m.trigger, "caption": m.caption} for m in self.members
            ],
            "config": json.loads(self.config_json),
            "metrics": json.loads(self.metrics_json),
            "created_at": self.created_at,
        }


class CollectionMember(Base):
    __tablename__ = "collection_members"

    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id"), primary_key=True)
    effect_name: Mapped[str] = mapped_column(primary_key=True)
    trigger: Mapped[str]
    caption: Mapped[str]
    teacher_sha256: Mapped[str]

    collection: Mapped[Collection] = relationship(back_populates="members")


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(primary_key=True)
    kind: Mapped[str]
    config_json: Mapped[str] = mapped_column("config", Text)
    status: Mapped[str]
    step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int]
    run_dir: Mapped[str] = mapped_column(WorkspacePath)
    collection_id: Mapped[int | None] = mapped_column(ForeignKey("collections.id"))
    message: Mapped[str | None]
    started_at: Mapped[str]
    updated_at: Mapped[str]


class BaseModelRow(Base):
    """A base model recorded from a local folder (``clora base add``)."""

    __tablename__ = "bases"

    name: Mapped[str] = mapped_column(primary_key=True)
    kind: Mapped[str]
    path: Mapped[str] = mapped_column(WorkspacePath)
    options_json: Mapped[str] = mapped_column("options", Text, default="{}")
    fingerprint: Mapped[str]
    info_json: Mapped[str] = mapped_column("info", Text, default="{}")
    created_at: Mapped[str]

    @property
    def options(self) -> dict[str, str]:
        return dict(json.loads(self.options_json))

    @property
    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.info_json))


class Setting(Base):
    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str]
