"""Schema version and migrations: applied in order, each exactly once; newer stores refused."""

import pyarrow as pa
import pytest

from store import SCHEMA_VERSION, Store, StoreError, migrations, new_id


def test_a_new_store_is_at_the_current_schema_version(tmp_path):
    store = Store.open(tmp_path / "store")
    assert store.schema_version == SCHEMA_VERSION == migrations.MIGRATIONS[-1][0]
    for table in ("sessions", "messages", "judgments", "runs", "variants"):
        assert store.count(table) == 0


def _recording(ran, version, migrate):
    def wrapped(db):
        ran.append(version)
        migrate(db)
    return wrapped


def _add_pinned(db):
    # Safe to run again, as migrations must be.
    if "pinned" not in db.open_table("sessions").schema.names:
        db.open_table("sessions").add_columns(pa.field("pinned", pa.bool_()))


def test_migrations_run_in_order_and_once(tmp_path, monkeypatch):
    ran: list[int] = []
    original = list(migrations.MIGRATIONS)
    monkeypatch.setattr(migrations, "MIGRATIONS",
                        [(v, _recording(ran, v, fn)) for v, fn in original]
                        + [(len(original) + 1, _recording(ran, len(original) + 1, _add_pinned))])
    latest = len(original) + 1

    store = Store.open(tmp_path / "store")
    assert ran == list(range(1, latest + 1))
    assert store.schema_version == latest
    Store.open(tmp_path / "store")
    assert ran == list(range(1, latest + 1)), "a second open re-ran migrations"

    # the added column is writable and reads back
    sid = new_id()
    store.upsert("sessions", [{"id": sid, "persona": "p", "pinned": True}])
    assert store.get("sessions", sid)["pinned"] is True


def test_an_older_store_gets_only_the_newer_migrations(tmp_path, monkeypatch):
    old = Store.open(tmp_path / "store")
    sid = new_id()
    old.upsert("sessions", [{"id": sid, "persona": "p"}])

    ran: list[int] = []
    latest = SCHEMA_VERSION + 1
    monkeypatch.setattr(migrations, "MIGRATIONS",
                        [(v, _recording(ran, v, fn)) for v, fn in migrations.MIGRATIONS]
                        + [(latest, _recording(ran, latest, _add_pinned))])
    upgraded = Store.open(tmp_path / "store")
    assert ran == [latest]
    assert upgraded.schema_version == latest
    assert upgraded.get("sessions", sid)["pinned"] is None  # old rows kept, new column null


def test_a_failed_migration_leaves_the_version_at_the_last_good_one(tmp_path, monkeypatch,
                                                                    user_error):
    def broken(db):
        raise RuntimeError("lance error: LanceError(IO): boom, /x/y/src/io.rs:1:2")

    monkeypatch.setattr(migrations, "MIGRATIONS",
                        [*migrations.MIGRATIONS, (SCHEMA_VERSION + 1, broken)])
    with pytest.raises(StoreError) as caught:
        Store.open(tmp_path / "store")
    user_error(caught.value, tmp_path / "store", f"migration {SCHEMA_VERSION + 1}", "boom")
    monkeypatch.undo()
    assert Store.open(tmp_path / "store").schema_version == SCHEMA_VERSION


def test_migrations_out_of_order_are_a_programming_error(tmp_path, monkeypatch):
    monkeypatch.setattr(migrations, "MIGRATIONS", [(2, _add_pinned), (1, _add_pinned)])
    with pytest.raises(ValueError, match="in order"):
        Store.open(tmp_path / "store")


def test_a_store_from_a_newer_kyara_is_refused(tmp_path, user_error):
    store = Store.open(tmp_path / "store")
    newer = SCHEMA_VERSION + 5
    store.upsert("meta", [{"id": "schema_version", "value": str(newer)}])
    with pytest.raises(StoreError) as caught:
        Store.open(tmp_path / "store")
    assert str(caught.value) == (f"store at {store.path} has schema version {newer}, "
                                 f"this kyara knows up to {SCHEMA_VERSION}; upgrade kyara")
    user_error(caught.value, store.path)
    assert store.schema_version == newer  # refusing did not touch it
