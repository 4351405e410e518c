"""Ordered schema migrations.

MIGRATIONS is a list of (version, function) in ascending version order, starting at 1.
Store.open applies every migration newer than the store's recorded version, in order,
under the store's write lock, and records the new version after EACH one, so a crash
between two migrations resumes at the next one.

A crash can still land between a migration's work and the recording of its version, so a
migration must be safe to run again (create with exist_ok, check before adding a column).
Never edit a released migration: add a new one, and bump nothing else by hand —
SCHEMA_VERSION follows from this list.
"""

from __future__ import annotations

from collections.abc import Callable

from lancedb.db import DBConnection

from store.schemas import TABLES_V1, TABLES_V2

Migration = Callable[[DBConnection], None]


def _v1_create_tables(db: DBConnection) -> None:
    for name, schema in TABLES_V1.items():
        db.create_table(name, schema=schema, exist_ok=True)


def _v2_create_feedback_tables(db: DBConnection) -> None:
    """Human feedback: labels, preferences, alternatives (regenerated replies) and edits."""
    for name, schema in TABLES_V2.items():
        db.create_table(name, schema=schema, exist_ok=True)


MIGRATIONS: list[tuple[int, Migration]] = [
    (1, _v1_create_tables),
    (2, _v2_create_feedback_tables),
]

SCHEMA_VERSION: int = MIGRATIONS[-1][0]


def latest_version(migrations: list[tuple[int, Migration]]) -> int:
    """The version a store reaches after `migrations`; checks they are well ordered."""
    versions = [version for version, _ in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"MIGRATIONS must be numbered 1, 2, 3, ... in order, got {versions}")
    return versions[-1] if versions else 0
