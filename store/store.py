"""Store: kyara's LanceDB database of sessions, messages, judgments, runs, variants,
knowledge and the human feedback (labels, preferences, alternatives, edits), in one
directory (the caller resolves it; by default `$KYARA_HOME/store`).

Concurrency: several processes (the console, detached jobs) may use one store at once.
- Every write holds the store's flock (store/lock.py) for the whole lance commit, so
  writes are serialised across processes; a lance commit conflict that still surfaces
  (e.g. from a writer that does not take the lock) is retried with bounded backoff.
- Reads take no lock. The connection uses read_consistency_interval=0, so every read
  sees the latest committed version, including other processes' writes.

Durability: a write returns after lance has committed a new table version (data files and
manifest written, manifest made current). Lance does not fsync, so that survives the
writer being killed (SIGKILL) but not necessarily a power cut.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import lancedb
import pyarrow as pa
from lancedb.index import FTS

from store import migrations
from store.errors import (
    HINT_BUG,
    HINT_DAMAGED,
    HINT_DIRECTORY,
    HINT_UPGRADE,
    StoreError,
    short_reason,
    translate,
)
from store.lock import LOCK_NAME, LockTimeout, flocked
from store.schemas import (
    CHOICES,
    CREATED_NS,
    DEFAULTS,
    KNOWLEDGE,
    KNOWLEDGE_TEXT_COLUMNS,
    META,
    META_TABLE,
    NOW,
    TABLE_NAMES,
    TOUCHED,
    knowledge_schema,
    vector_dim,
)
from store.sql import quote, quote_list

T = TypeVar("T")

VERSION_KEY = "schema_version"
COMMIT_ATTEMPTS = 5         # lance commit conflicts: tries in all, then give up
BACKOFF_S = 0.05            # first retry pause; doubles each time, with jitter
COMPACT_AFTER = 32          # small fragments a table may gather before a write compacts it
# Versions older than this are deleted when compacting. Every read checks out the latest
# version when it starts, so only a read running for longer than this could lose its files.
KEEP_OLD_VERSIONS = timedelta(hours=1)
_CONFLICT = re.compile(r"commit conflict|write contention|incompatible ?transaction",
                       re.IGNORECASE)


log = logging.getLogger(__name__)


def _optimize(tbl: Any) -> None:
    tbl.optimize(cleanup_older_than=KEEP_OLD_VERSIONS)


def new_id() -> str:
    """A fresh row id (uuid4 string). Ids are made by the client so a retried write is
    idempotent: the same row upserted twice is still one row."""
    return str(uuid.uuid4())


def utcnow() -> datetime:
    """The current time as the store keeps it (aware, UTC)."""
    return datetime.now(timezone.utc)


class Store:
    """A kyara store. Open with Store.open(path) or Store(path).

    Opening creates missing directories (mode 0700), connects, and applies pending schema
    migrations. Every failure a user can cause raises StoreError with a one-line message.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 30.0) -> None:
        self.path = Path(path).expanduser().absolute()
        self.lock_timeout = lock_timeout
        # One writer thread at a time inside this process; _lock_depth lets a write
        # started inside another write (a migration recording its version) re-enter.
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        _make_private_dirs(self.path)
        self._db = self._call(
            lambda: lancedb.connect(str(self.path), read_consistency_interval=timedelta(0)),
            "open the store",
        )
        self._migrate()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lock_timeout: float = 30.0) -> Store:
        return cls(path, lock_timeout=lock_timeout)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # --- reading ----------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        """The schema version recorded in the store (0 for a store never migrated)."""
        return self._read_version()

    def get(self, table: str, id: str) -> dict[str, Any] | None:
        """The row with this id, or None."""
        found = self.rows(table, where=f"id = {quote(id)}", limit=1)
        return found[0] if found else None

    def rows(self, table: str, where: str | None = None, limit: int | None = None,
             order_by: str | None = None) -> list[dict[str, Any]]:
        """Rows of `table` matching the lance SQL filter `where` (build it with quote()).

        Storage order is NOT insertion order (an upsert moves the updated row to the end),
        so pass order_by (a column; nulls last) when order matters. limit applies after
        ordering.
        """
        tbl = self._table(table)

        def read() -> list[dict[str, Any]]:
            query = tbl.search()
            if where:
                query = query.where(where)
            if limit is not None and order_by is None:
                query = query.limit(limit)
            return query.to_arrow().to_pylist()

        found = self._read(read, table, where)
        if order_by is not None:
            if order_by not in self._call(lambda: tbl.schema, f"read table {table!r}").names:
                raise StoreError(self.path, f"has no column {order_by!r} in table {table!r}",
                                 HINT_BUG)
            found.sort(key=lambda row: (row[order_by] is None, row[order_by]))
            if limit is not None:
                found = found[:limit]
        return found

    def count(self, table: str, where: str | None = None) -> int:
        """How many rows `table` has (matching `where`, if given)."""
        tbl = self._table(table)
        return self._read(lambda: tbl.count_rows(where), table, where)

    # --- writing ----------------------------------------------------------------------

    def upsert(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Insert or replace rows by `id`; returns once lance has committed them.

        A row REPLACES the stored row with its id (whole-row, not a patch): columns it
        leaves out get their default (schemas.DEFAULTS) or null. `updated_at` is always set
        to the write time. Within one call the last row for an id wins.
        """
        rows = list(rows)
        if not rows:
            return
        doing = f"write table {table!r}"
        with self._writing(doing):
            tbl = self._table(table)
            schema = self._call(lambda: tbl.schema, doing)
            data = self._prepare(table, schema, rows)
            self._commit(
                lambda: tbl.merge_insert("id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(data),
                doing,
            )
            self._compact_if_fragmented(tbl, table)

    @contextmanager
    def locked(self, doing: str = "write") -> Iterator[None]:
        """Hold the cross-process write lock over several reads and writes, so a
        read -> decide -> write step (e.g. choosing among a reply's alternatives) cannot
        interleave with another process's writes. Upserts and deletes inside re-enter it;
        `doing` names the work in the message when the lock cannot be had."""
        with self._writing(doing):
            yield

    def delete(self, table: str, ids: Iterable[str]) -> None:
        """Delete the rows with these ids (ids not present are ignored)."""
        ids = list(ids)
        if not ids:
            return
        doing = f"delete from table {table!r}"
        with self._writing(doing):
            tbl = self._table(table)
            self._commit(lambda: tbl.delete(f"id IN {quote_list(ids)}"), doing)
            self._compact_if_fragmented(tbl, table)

    def compact(self) -> None:
        """Compact every table now (writes also do it by themselves, see below)."""
        with self._writing("compact the store"):
            for name in sorted(self._table_names() & set(TABLE_NAMES)):
                tbl = self._table(name)
                self._commit(partial(_optimize, tbl), f"compact table {name!r}")

    def _compact_if_fragmented(self, tbl: Any, table: str) -> None:
        """Compact `tbl` once COMPACT_AFTER small fragments have piled up.

        Each lance write adds a fragment, a transaction file and a manifest listing every
        fragment, so one-row writes get slower and bigger as they go (measured: 9 ms per
        upsert at first, 98 ms after 1000; get 235 ms; 60 MB of manifests). Compaction
        brings that back to ~10 ms. Called under the write lock, after a committed write:
        a failure here is logged, not raised, because the caller's write did succeed.
        """
        try:
            stats = tbl.stats()
            if stats["fragment_stats"]["num_small_fragments"] >= COMPACT_AFTER:
                _optimize(tbl)
        except Exception as exc:  # housekeeping only; the next write tries again
            log.warning("store at %s: could not compact table %r: %s", self.path, table,
                        short_reason(exc), exc_info=True)

    # --- knowledge (vector) table -----------------------------------------------------

    def knowledge_dim(self) -> int | None:
        """The vector width of the knowledge table, or None while it does not exist."""
        if KNOWLEDGE not in self._table_names():
            return None
        tbl = self._table(KNOWLEDGE)
        return vector_dim(self._call(lambda: tbl.schema, "read the knowledge table"))

    def knowledge_columns(self) -> list[str] | None:
        """The knowledge table's column names, or None while it does not exist: a table
        written by an earlier kyara lacks the newer ones (see knowledge_schema)."""
        tbl = self._knowledge_or_none()
        if tbl is None:
            return None
        return list(self._call(lambda: tbl.schema, "read the knowledge table").names)

    def knowledge_table(self, dim: int) -> None:
        """Make sure the knowledge table exists with `dim`-wide vectors.

        Creates it when missing. If it exists with another width (the embedder changed),
        raises StoreError: re-index with drop_knowledge() and fill it again.
        """
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise StoreError(self.path, f"cannot make a knowledge table with dim={dim!r}",
                             "dim must be a positive int (the embedder's vector width)")
        existing = self.knowledge_dim()
        if existing is None:
            doing = "create the knowledge table"
            with self._writing(doing):
                # Re-check under the lock: another process may have just created it.
                if KNOWLEDGE not in self._table_names():
                    self._call(lambda: self._db.create_table(
                        KNOWLEDGE, schema=knowledge_schema(dim, time.time_ns())), doing)
            existing = self.knowledge_dim()
        if existing != dim:
            raise StoreError(
                self.path,
                f"has a knowledge table of {existing}-dimensional vectors, not {dim}",
                "the embedder changed: re-index (Store.drop_knowledge(), then add the "
                "knowledge again)",
            )

    def drop_knowledge(self) -> None:
        """Delete the knowledge table (to re-index with another embedder)."""
        doing = "drop the knowledge table"
        with self._writing(doing):
            if KNOWLEDGE in self._table_names():
                self._call(lambda: self._db.drop_table(KNOWLEDGE), doing)

    def knowledge_version(self) -> int | None:
        """A number that changes whenever the knowledge table may have changed (any write,
        and a drop and re-create), for caches of its rows; None while it does not exist."""
        tbl = self._knowledge_or_none()
        return None if tbl is None else self._version_of(tbl)

    def knowledge_snapshot(self, where: str | None = None,
                           ) -> tuple[int | None, list[dict[str, Any]], int]:
        """(knowledge_version(), the rows matching `where`, the table's row count), all read
        from one version of the table, for caches keyed by the version; (None, [], 0)
        while the table does not exist."""
        tbl = self._knowledge_or_none()
        if tbl is None:
            return None, [], 0
        at = self._call(lambda: tbl.version, "read the knowledge table")
        self._call(lambda: tbl.checkout(at), "read the knowledge table")  # pinned to `at`
        version = self._version_of(tbl)

        def read() -> list[dict[str, Any]]:
            query = tbl.search()
            return (query.where(where) if where else query).to_arrow().to_pylist()

        rows = self._read(read, KNOWLEDGE, where)
        return version, rows, self._read(tbl.count_rows, KNOWLEDGE, None)

    def knowledge_text_hits(self, query: str, limit: int = 10, where: str | None = None,
                            ) -> tuple[int | None, list[dict[str, Any]]]:
        """The retriever's hot path with one table open instead of two:
        (knowledge_version(), search_knowledge_text(query, limit, where)) read from the
        same opened table; (None, []) while the table does not exist."""
        tbl = self._knowledge_or_none()
        if tbl is None:
            return None, []
        return self._version_of(tbl), self._search_text(tbl, query, limit, where)

    def index_knowledge_text(self) -> None:
        """(Re)build the full-text index on knowledge `text` for search_knowledge_text().
        Rows written after it are still found (lance searches them unindexed, slower)."""
        doing = "index the knowledge text"
        with self._writing(doing):
            tbl = self._table(KNOWLEDGE)
            # Japanese has no spaces: index character n-grams of 1 to 3 characters (the
            # default word tokenizer finds nothing); English stemming and stop words off.
            config = FTS(base_tokenizer="ngram", ngram_min_length=1, ngram_max_length=3,
                         stem=False, remove_stop_words=False)
            self._commit(lambda: tbl.create_index("text", config=config, replace=True), doing)

    def search_knowledge_text(self, query: str, limit: int = 10,
                              where: str | None = None) -> list[dict[str, Any]]:
        """Knowledge rows matching `query` by full text (BM25), best first, each with a
        `_score` key and without the vector. Needs index_knowledge_text() once."""
        return self._search_text(self._table(KNOWLEDGE), query, limit, where)

    def _search_text(self, tbl: Any, query: str, limit: int,
                     where: str | None) -> list[dict[str, Any]]:
        if not query.strip():
            return []
        columns = list(KNOWLEDGE_TEXT_COLUMNS)  # known names: no schema read on the hot path

        def search() -> list[dict[str, Any]]:
            found = tbl.search(query, query_type="fts").select([*columns, "_score"]).limit(limit)
            if where:
                found = found.where(where, prefilter=True)
            try:
                return found.to_arrow().to_pylist()
            except ValueError as exc:
                if "INVERTED index" not in str(exc):
                    raise
                raise StoreError(self.path, "has no full-text index on the knowledge text",
                                 "call Store.index_knowledge_text() after adding knowledge"
                                 ) from exc

        return self._read(search, KNOWLEDGE, where)

    def nearest(self, vector: Sequence[float], limit: int = 5,
                where: str | None = None) -> list[dict[str, Any]]:
        """Knowledge rows nearest to `vector` (L2), each with a `_distance` key."""
        tbl = self._table(KNOWLEDGE)
        dim = vector_dim(self._call(lambda: tbl.schema, "read the knowledge table"))
        if len(vector) != dim:
            raise StoreError(self.path, f"has {dim}-dimensional knowledge vectors; "
                             f"the query vector has {len(vector)}", HINT_BUG)

        def search() -> list[dict[str, Any]]:
            query = tbl.search(list(vector), vector_column_name="vector").limit(limit)
            if where:
                query = query.where(where, prefilter=True)
            return query.to_arrow().to_pylist()

        return self._read(search, KNOWLEDGE, where)

    # --- internals --------------------------------------------------------------------

    def _knowledge_or_none(self) -> Any:
        try:
            return self._table(KNOWLEDGE)
        except StoreError:
            if KNOWLEDGE not in self._table_names():
                return None
            raise

    def _version_of(self, tbl: Any) -> int:
        def version() -> int:
            created = int((tbl.schema.metadata or {}).get(CREATED_NS, b"0"))
            return created << 32 | tbl.version

        return self._call(version, "read the knowledge table")

    def _call(self, fn: Callable[[], T], doing: str) -> T:
        """Run a lance/pyarrow/OS call; any failure becomes a StoreError."""
        try:
            return fn()
        except StoreError:
            raise
        except Exception as exc:
            raise translate(exc, self.path, doing) from exc

    def _read(self, fn: Callable[[], T], table: str, where: str | None) -> T:
        try:
            return fn()
        except StoreError:
            raise
        except ValueError as exc:
            # lancedb raises ValueError for a bad filter ("Invalid input, ... No field named")
            if where and "invalid input" in str(exc).lower():
                raise StoreError(self.path, f"cannot filter table {table!r} by {where!r}: "
                                 f"{short_reason(exc)}", HINT_BUG) from exc
            raise translate(exc, self.path, f"read table {table!r}") from exc
        except Exception as exc:
            raise translate(exc, self.path, f"read table {table!r}") from exc

    def _commit(self, fn: Callable[[], T], doing: str) -> T:
        """Run a lance write, retrying commit conflicts with bounded, jittered backoff."""
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                return fn()
            except StoreError:
                raise
            except Exception as exc:
                if _CONFLICT.search(str(exc)) and attempt + 1 < COMMIT_ATTEMPTS:
                    time.sleep(BACKOFF_S * 2**attempt * random.uniform(0.5, 1.5))
                    continue
                raise translate(exc, self.path, doing) from exc
        raise AssertionError("unreachable")  # the last attempt returns or raises

    @contextmanager
    def _writing(self, doing: str) -> Iterator[None]:
        """Hold the cross-process write lock (re-entrant within this thread)."""
        with self._thread_lock:
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            with ExitStack() as stack:
                try:
                    stack.enter_context(flocked(self.path / LOCK_NAME, self.lock_timeout))
                except LockTimeout as exc:
                    raise StoreError(
                        self.path,
                        f"is busy: another process held its write lock for over "
                        f"{self.lock_timeout:g}s (could not {doing})",
                        "wait for the other kyara process (a job?) or stop it",
                    ) from exc
                except OSError as exc:
                    raise translate(exc, self.path, doing) from exc
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0

    def _table_names(self) -> set[str]:
        def list_all() -> set[str]:
            names: list[str] = []
            token = None
            while True:
                page = self._db.list_tables(page_token=token)
                names.extend(page.tables)
                token = page.page_token
                if not token:
                    return set(names)

        return self._call(list_all, "list its tables")

    def _table(self, name: str) -> Any:
        """Open a table. Opened afresh each time (about 0.5 ms): another process may have
        dropped and re-created it (the knowledge table) since we last looked."""
        if name not in TABLE_NAMES:
            raise StoreError(self.path, f"has no table {name!r} "
                             f"(tables: {', '.join(TABLE_NAMES)})", HINT_BUG)
        try:
            return self._db.open_table(name)
        except ValueError as exc:
            if "not found" not in str(exc):
                raise translate(exc, self.path, f"open table {name!r}") from exc
            if name == KNOWLEDGE:
                raise StoreError(self.path, "has no knowledge table yet",
                                 "call Store.knowledge_table(dim) first") from exc
            raise StoreError(self.path, f"is missing its {name!r} table", HINT_DAMAGED) from exc
        except Exception as exc:
            raise translate(exc, self.path, f"open table {name!r}") from exc

    def _prepare(self, table: str, schema: pa.Schema, rows: list[Mapping[str, Any]]) -> pa.Table:
        """Check rows against the table's live schema, fill defaults, make an Arrow table."""
        now = utcnow()
        defaults = DEFAULTS.get(table, {})
        by_id: dict[str, dict[str, Any]] = {}
        for index, given in enumerate(rows):
            def bad(problem: str, index: int = index) -> StoreError:
                return StoreError(self.path, f"cannot write row {index} to table {table!r}: "
                                  f"{problem}", HINT_BUG)

            if not isinstance(given, Mapping):
                raise bad(f"a row must be a dict, not {type(given).__name__}")
            unknown = sorted(set(given) - set(schema.names))
            if unknown:
                raise bad(f"unknown column(s) {', '.join(map(repr, unknown))}")
            row = dict(given)
            for column, default in defaults.items():
                if row.get(column) is None and column in schema.names:
                    row[column] = now if default is NOW else default
            for column in TOUCHED:
                if column in schema.names:
                    row[column] = now
            for field in schema:
                value = row.get(field.name)
                if value is None:
                    if not field.nullable:
                        raise bad(f"column {field.name!r} is required")
                    continue
                if isinstance(value, datetime) and value.tzinfo is None:
                    raise bad(f"column {field.name!r} got a naive datetime; "
                              "give it a timezone (e.g. store.utcnow())")
                allowed = CHOICES.get((table, field.name))
                if allowed is not None and value not in allowed:
                    raise bad(f"column {field.name!r} must be one of "
                              f"{', '.join(sorted(allowed))}, not {value!r}")
            if not isinstance(row["id"], str) or not row["id"]:
                raise bad("id must be a non-empty string (use store.new_id())")
            by_id.pop(row["id"], None)  # merge_insert needs unique keys: the last one wins
            by_id[row["id"]] = row
        try:
            return pa.Table.from_pylist(list(by_id.values()), schema=schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise StoreError(self.path, f"cannot write table {table!r}: a value does not fit "
                             f"its column: {short_reason(exc)}", HINT_BUG) from exc

    # --- schema version and migrations ------------------------------------------------

    def _read_version(self) -> int:
        if META_TABLE not in self._table_names():
            return 0
        row = self.get(META_TABLE, VERSION_KEY)
        if row is None:
            return 0
        try:
            return int(row["value"])
        except ValueError as exc:
            raise StoreError(self.path, f"records a bad schema version {row['value']!r}",
                             HINT_DAMAGED) from exc

    def _write_version(self, version: int) -> None:
        with self._writing("record the schema version"):
            if META_TABLE not in self._table_names():
                self._call(lambda: self._db.create_table(META_TABLE, schema=META),
                           "create the meta table")
            self.upsert(META_TABLE, [{"id": VERSION_KEY, "value": str(version)}])

    def _refuse_newer(self, current: int, known: int) -> None:
        if current > known:
            raise StoreError(self.path, f"has schema version {current}, this kyara knows up "
                             f"to {known}", HINT_UPGRADE)

    def _migrate(self) -> None:
        # Read at call time (not import time) so tests can swap in their own list.
        plan = migrations.MIGRATIONS
        target = migrations.latest_version(plan)
        current = self._read_version()
        self._refuse_newer(current, target)
        if current == target:
            return  # no lock needed: an up-to-date read-only store still opens for reading
        with self._writing("upgrade the store schema"):
            current = self._read_version()  # another process may have migrated meanwhile
            self._refuse_newer(current, target)
            for version, migrate in plan:
                if version > current:
                    self._commit(partial(migrate, self._db), f"apply schema migration {version}")
                    self._write_version(version)


def _make_private_dirs(path: Path) -> None:
    """Create `path` and any missing parents with mode 0700.

    mkdir's mode is filtered by the umask, so each directory WE create is chmod-ed
    explicitly; directories that already existed are left as they are.
    """
    try:
        if path.exists() and not path.is_dir():
            raise StoreError(path, "is not a directory (a file is in the way)", HINT_DIRECTORY)
        missing = []
        probe = path
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                if not directory.is_dir():
                    raise StoreError(path, "is not a directory (a file is in the way)",
                                     HINT_DIRECTORY) from None
                continue  # another process made it first (and chmod-ed it)
            os.chmod(directory, 0o700)
    except StoreError:
        raise
    except OSError as exc:
        raise translate(exc, path, "create the store directory") from exc
