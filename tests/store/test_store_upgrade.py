"""Migration 2 (the feedback tables): stores written by version 1 upgrade in place, and a
store written by this version opens again as it is."""

import shutil
from pathlib import Path

import pytest

from store import SCHEMA_VERSION, Store, StoreError, migrations, new_id, utcnow
from store.schemas import TABLES_V2

V1_STORE = Path(__file__).resolve().parent / "data" / "store_v1"
FEEDBACK = ("labels", "preferences", "alternatives", "edits")


def test_feedback_tables_come_from_migration_2():
    assert [v for v, _ in migrations.MIGRATIONS] == [1, 2]
    assert SCHEMA_VERSION == 2
    assert tuple(TABLES_V2) == FEEDBACK


def test_a_store_written_by_version_1_upgrades_in_place(tmp_path):
    """tests/store/data/store_v1 was written by the version-1 code (see its README)."""
    path = tmp_path / "store"
    shutil.copytree(V1_STORE, path)
    store = Store.open(path)
    assert store.schema_version == 2
    # the old rows are all there, as they were
    assert store.get("sessions", "s-1")["title"] == "v1 chat"
    assert [m["id"] for m in store.rows("messages", order_by="seq")] == ["m-user", "m-reply"]
    assert store.get("judgments", "j-1")["score"] == 6
    # the new tables are there, empty and writable
    for table in FEEDBACK:
        assert store.count(table) == 0
    store.upsert("labels", [{"id": new_id(), "message_id": "m-reply", "criterion": "thumbs",
                             "score": 2, "rater": "me"}])
    assert store.count("labels") == 1
    assert Store.open(path).schema_version == 2  # a second open changes nothing


def _recording(ran, version, migrate):
    def wrapped(db):
        ran.append(version)
        migrate(db)
    return wrapped


def test_a_store_migrated_to_1_only_gets_migration_2(tmp_path, monkeypatch):
    """The version-1 code path of today's code: only migration 1 applied."""
    path = tmp_path / "store"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
    old = Store.open(path)
    assert old.schema_version == 1
    sid = new_id()
    old.upsert("sessions", [{"id": sid, "persona": "ayane"}])
    with pytest.raises(StoreError):
        old.count("labels")  # version 1 knows the name but the table is not there yet
    monkeypatch.undo()

    ran: list[int] = []
    monkeypatch.setattr(migrations, "MIGRATIONS",
                        [(v, _recording(ran, v, fn)) for v, fn in migrations.MIGRATIONS])
    store = Store.open(path)
    assert ran == [2]
    assert store.schema_version == 2
    assert store.get("sessions", sid)["persona"] == "ayane"
    for table in FEEDBACK:
        assert store.count(table) == 0


def test_a_store_written_by_this_version_opens_again(tmp_path):
    path = tmp_path / "store"
    store = Store.open(path)
    mid = new_id()
    store.upsert("preferences", [{
        "id": mid, "prompt_json": '[{"role": "user", "content": "q"}]', "chosen_text": "a",
        "rejected_text": "b", "source": "human", "variants_json": "{}"}])
    again = Store.open(path)
    assert again.schema_version == SCHEMA_VERSION
    row = again.get("preferences", mid)
    assert row["tie"] is False and row["created_at"] <= utcnow()


def test_migration_2_is_safe_to_run_again(tmp_path):
    store = Store.open(tmp_path / "store")
    store.upsert("edits", [{"id": "e", "message_id": "m", "edited_id": "n",
                            "original_text": "o", "edited_text": "x"}])
    migrations.MIGRATIONS[1][1](store._db)  # a crash between the work and the version
    assert store.count("edits") == 1


def test_closed_vocabularies_are_checked(tmp_path, user_error):
    store = Store.open(tmp_path / "store")
    with pytest.raises(StoreError) as caught:
        store.upsert("preferences", [{
            "id": new_id(), "prompt_json": "[]", "chosen_text": "a", "rejected_text": "b",
            "source": "crowd", "variants_json": "{}"}])
    user_error(caught.value, store.path, "source", "human", "crowd")


def test_locked_holds_the_write_lock_across_reads_and_writes(tmp_path):
    import fcntl

    store = Store.open(tmp_path / "store")
    with store.locked("test"):
        store.upsert("labels", [{"id": "l", "message_id": "m", "criterion": "thumbs",
                                 "score": 1, "rater": "me"}])  # re-enters the lock
        with open(store.path / ".kyara-store.lock", "a") as fh, pytest.raises(OSError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another holder is refused
    assert store.count("labels") == 1
