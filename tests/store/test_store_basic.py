"""Store basics: idempotent upserts, round trips, reads, validation, directories, knowledge."""

import os
import stat
import threading
from datetime import datetime, timedelta, timezone

import lancedb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import SCHEMA_VERSION, Store, StoreError, new_id, quote, quote_list


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "store")


def _message(session_id, seq, **extra):
    return {"id": new_id(), "session_id": session_id, "seq": seq, "role": "user",
            "content": f"message {seq}", **extra}


# --- upsert and reads ------------------------------------------------------------------

def test_upsert_same_id_twice_leaves_one_updated_row(store):
    row = {"id": new_id(), "persona": "aoi", "title": "first"}
    store.upsert("sessions", [row])
    store.upsert("sessions", [{**row, "title": "second"}])
    assert store.count("sessions") == 1
    assert store.get("sessions", row["id"])["title"] == "second"


def test_within_one_call_the_last_row_for_an_id_wins(store):
    sid = new_id()
    store.upsert("sessions", [{"id": sid, "persona": "a", "title": "one"},
                              {"id": sid, "persona": "a", "title": "two"}])
    assert [r["title"] for r in store.rows("sessions")] == ["two"]


def test_message_round_trips_lists_nulls_numbers_and_times(store):
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    full = _message("s1", 7, role="assistant", status="incomplete", variant="v", adapter="lora",
                    rag=True, rendered_prompt="<p>", retrieved_ids=["k1", "k2"],
                    options_json='{"temperature": 0.7}', prompt_tokens=12,
                    completion_tokens=34, ttft_ms=12.5, tokens_per_s=40.25,
                    stop_reason="length", error=None, created_at=created)
    no_rag = _message("s1", 8, retrieved_ids=None)
    empty_rag = _message("s1", 9, rag=True, retrieved_ids=[])
    store.upsert("messages", [full, no_rag, empty_rag])

    got = store.get("messages", full["id"])
    assert got == full
    assert got["created_at"] == created and got["created_at"].utcoffset() == timedelta(0)
    # null ("no retrieval") and [] ("retrieval found nothing") stay different
    assert store.get("messages", no_rag["id"])["retrieved_ids"] is None
    assert store.get("messages", empty_rag["id"])["retrieved_ids"] == []


def test_aware_times_in_any_zone_are_stored_as_the_same_instant_in_utc(store):
    tokyo = timezone(timedelta(hours=9))
    variant = {"id": new_id(), "name": "v", "backend": "gguf",
               "created_at": datetime(2026, 5, 1, 9, 0, tzinfo=tokyo)}
    store.upsert("variants", [variant])
    got = store.get("variants", variant["id"])["created_at"]
    assert got == datetime(2026, 5, 1, 0, 0, tzinfo=timezone.utc)
    assert got.utcoffset() == timedelta(0)


def test_left_out_columns_get_defaults_or_nulls(store):
    before = datetime.now(timezone.utc)
    message = _message("s1", 1)
    store.upsert("messages", [message])
    got = store.get("messages", message["id"])
    assert (got["status"], got["rag"], got["ttft_ms"], got["retrieved_ids"]) == \
        ("complete", False, None, None)
    assert before <= got["created_at"] <= datetime.now(timezone.utc)
    judgment = {"id": new_id(), "message_id": message["id"], "criterion": "in_character",
                "judge_model": "j", "prompt_version": "v1", "status": "failed"}
    store.upsert("judgments", [judgment])
    got = store.get("judgments", judgment["id"])
    assert (got["score"], got["tokens"], got["attempts"]) == (None, 0, 1)


def test_updated_at_is_the_time_of_the_latest_write(store):
    run = {"id": new_id(), "kind": "finetune", "name": "r", "status": "running", "pid": 42}
    store.upsert("runs", [run])
    first = store.get("runs", run["id"])
    store.upsert("runs", [{**first, "status": "done", "pid": None}])
    second = store.get("runs", run["id"])
    assert second["updated_at"] > first["updated_at"]
    assert second["created_at"] == first["created_at"]
    assert (second["status"], second["pid"]) == ("done", None)


def test_rows_count_get_with_filters_limit_and_order(store):
    store.upsert("messages", [_message("a", seq) for seq in (3, 1, 2)])
    store.upsert("messages", [_message("b", 1)])
    assert store.count("messages") == 4
    assert store.count("messages", where=f"session_id = {quote('a')}") == 3
    ordered = store.rows("messages", where=f"session_id = {quote('a')}", order_by="seq")
    assert [r["seq"] for r in ordered] == [1, 2, 3]
    assert [r["seq"] for r in store.rows("messages", order_by="seq", limit=2)] == [1, 1]
    assert len(store.rows("messages", limit=2)) == 2
    assert store.get("messages", "no-such-id") is None
    assert store.rows("messages", where="seq > 100") == []


def test_delete_removes_only_the_given_ids(store):
    rows = [_message("a", seq) for seq in range(3)]
    store.upsert("messages", rows)
    store.delete("messages", [rows[0]["id"], "not-there"])
    assert {r["id"] for r in store.rows("messages")} == {rows[1]["id"], rows[2]["id"]}


def test_compact_keeps_every_row(store):
    for seq in range(12):
        store.upsert("messages", [_message("a", seq)])
    store.compact()
    assert sorted(r["seq"] for r in store.rows("messages")) == list(range(12))


def _fragments(store, table):
    return lancedb.connect(str(store.path)).open_table(table).stats()["fragment_stats"]


def test_one_row_writes_do_not_pile_up_fragments(store, monkeypatch):
    import store.store as store_module

    monkeypatch.setattr(store_module, "COMPACT_AFTER", 4)
    for seq in range(13):
        store.upsert("messages", [_message("a", seq)])
        assert _fragments(store, "messages")["num_small_fragments"] < 4
    assert sorted(r["seq"] for r in store.rows("messages")) == list(range(13))


def test_a_failed_compaction_does_not_fail_the_committed_write(store, monkeypatch, caplog):
    import store.store as store_module

    def broken(tbl):
        raise RuntimeError("lance error: LanceError(IO): boom")

    monkeypatch.setattr(store_module, "COMPACT_AFTER", 1)
    monkeypatch.setattr(store_module, "_optimize", broken)
    row = _message("a", 1)
    store.upsert("messages", [row])
    assert store.get("messages", row["id"]) is not None
    assert "could not compact table 'messages'" in caplog.text


def test_threads_sharing_one_store_do_not_lose_writes(store):
    def write(n):
        for seq in range(10):
            store.upsert("messages", [_message(f"t{n}", seq)])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count("messages") == 40


def test_writes_from_one_store_are_seen_by_another(tmp_path):
    first, second = Store.open(tmp_path / "s"), Store.open(tmp_path / "s")
    assert second.count("sessions") == 0  # read before the write: no stale cache after it
    first.upsert("sessions", [{"id": "x", "persona": "p"}])
    assert second.count("sessions") == 1


def test_commit_conflicts_are_retried_a_bounded_number_of_times(store, monkeypatch,
                                                                user_error):
    import store.store as store_module

    monkeypatch.setattr(store_module, "BACKOFF_S", 0.0)
    calls = []

    def conflicting(times):
        def commit():
            calls.append(1)
            if len(calls) <= times:
                raise RuntimeError("lance error: Retryable commit conflict for version 7: ...")
            return "committed"
        return commit

    assert store._commit(conflicting(2), "write table 'x'") == "committed"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(StoreError) as caught:
        store._commit(conflicting(100), "write table 'x'")
    assert len(calls) == store_module.COMMIT_ATTEMPTS
    user_error(caught.value, store.path, "could not write table 'x'", "commit conflict")
    calls.clear()
    with pytest.raises(StoreError):  # any other failure is not retried
        store._commit(lambda: calls.append(1) or 1 / 0, "write table 'x'")
    assert len(calls) == 1


# --- quoting ---------------------------------------------------------------------------

def test_quote_doubles_single_quotes_and_formats_other_literals():
    assert quote("it's") == "'it''s'"
    assert quote("a\\b") == "'a\\b'"
    assert (quote(None), quote(True), quote(3), quote(2.5)) == ("NULL", "TRUE", "3", "2.5")
    assert quote_list(["a", "b'c"]) == "('a', 'b''c')"
    assert quote_list([]) == "(NULL)"
    with pytest.raises(ValueError):
        quote(float("nan"))


def test_quoted_text_matches_exactly_its_row(tmp_path):
    store = Store.open(tmp_path / "store")
    decoy = {"id": new_id(), "persona": "decoy", "title": "x"}
    store.upsert("sessions", [decoy])

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.text(max_size=20) | st.sampled_from(["' OR '1'='1", "\\'", "'; --", "%", "_"]))
    def check(title):
        row = {"id": new_id(), "persona": "p", "title": title}
        store.upsert("sessions", [row])
        found = store.rows("sessions", where=f"title = {quote(title)} AND id = {quote(row['id'])}")
        assert [r["title"] for r in found] == [title]
        assert store.count("sessions", where=f"title = {quote(title)}") >= 1
        assert store.get("sessions", decoy["id"]) is not None

    check()


# --- bad input is a one-line StoreError -------------------------------------------------

@pytest.mark.parametrize("table, row, words", [
    ("sessions", {"id": "x", "persona": "p", "colour": "red"}, ["unknown column", "colour"]),
    ("sessions", {"id": "x"}, ["'persona' is required"]),
    ("sessions", {"id": "x", "persona": "p", "kind": "party"}, ["kind", "chat, compare"]),
    ("messages", {"id": "x", "session_id": "s", "seq": 1, "role": "narrator"}, ["role"]),
    ("sessions", {"id": "", "persona": "p"}, ["id must be"]),
    ("sessions", {"id": "x", "persona": "p", "created_at": datetime(2026, 1, 1)}, ["naive"]),
    ("messages", {"id": "x", "session_id": "s", "seq": "first", "role": "user"}, ["fit"]),
    ("nonsense", {"id": "x"}, ["no table 'nonsense'"]),
])
def test_bad_rows_are_refused_with_one_line(store, user_error, table, row, words):
    with pytest.raises(StoreError) as caught:
        store.upsert(table, [row])
    user_error(caught.value, store.path, *words)
    assert store.count("sessions") == 0


def test_bad_filter_is_a_store_error(store, user_error):
    with pytest.raises(StoreError) as caught:
        store.rows("sessions", where="no_such_column = 1")
    user_error(caught.value, store.path, "cannot filter table 'sessions'", "no_such_column")


# --- directories -----------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o222])  # usual; and one that strips owner write
def test_missing_directories_are_created_private_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = Store.open(tmp_path / "home" / "kyara" / "store")
    finally:
        os.umask(old)
    for directory in ("home", "home/kyara", "home/kyara/store"):
        assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(tmp_path.stat().st_mode) != 0o777  # existing parents left alone
    assert store.schema_version == SCHEMA_VERSION


def test_path_that_is_a_file_is_a_store_error(tmp_path, user_error):
    (tmp_path / "file").write_text("not a store")
    for path in (tmp_path / "file", tmp_path / "file" / "store"):
        with pytest.raises(StoreError) as caught:
            Store.open(path)
        user_error(caught.value, path, "is not a directory", "KYARA_STORE")


def test_corrupt_table_is_a_store_error_naming_the_table(store, user_error):
    store.upsert("messages", [_message("a", 1)])
    for manifest in (store.path / "messages.lance" / "_versions").glob("*.manifest"):
        manifest.write_bytes(b"\0garbage" * 4)
    reopened = Store.open(store.path)  # other tables are fine, so the store opens
    with pytest.raises(StoreError) as caught:
        reopened.rows("messages")
    user_error(caught.value, store.path, "'messages'", "damaged")
    assert caught.value.__cause__ is not None
    assert reopened.count("sessions") == 0


def test_corrupt_meta_table_fails_the_open(store, user_error):
    for manifest in (store.path / "meta.lance" / "_versions").glob("*.manifest"):
        manifest.write_bytes(b"garbage")
    with pytest.raises(StoreError) as caught:
        Store.open(store.path)
    user_error(caught.value, store.path, "meta")


# --- knowledge -------------------------------------------------------------------------

def _fact(vector, persona="aoi"):
    return {"id": new_id(), "persona": persona, "topic": "t", "text": f"fact {vector}",
            "content_hash": "h", "embedder": "e", "vector": vector}


def test_knowledge_table_has_the_dimension_it_was_created_with(store, user_error):
    with pytest.raises(StoreError) as caught:
        store.upsert("knowledge", [_fact([1.0, 0.0, 0.0])])
    user_error(caught.value, store.path, "no knowledge table", "knowledge_table(dim)")

    assert store.knowledge_dim() is None
    store.knowledge_table(3)
    store.knowledge_table(3)  # idempotent
    near, far = _fact([1.0, 0.0, 0.0]), _fact([0.0, 9.0, 0.0])
    store.upsert("knowledge", [near, far, _fact([1.0, 0.1, 0.0], persona="other")])
    hits = store.nearest([0.9, 0.0, 0.0], limit=1, where=f"persona = {quote('aoi')}")
    assert [h["id"] for h in hits] == [near["id"]]
    assert store.get("knowledge", near["id"])["vector"] == [1.0, 0.0, 0.0]

    with pytest.raises(StoreError) as caught:
        store.knowledge_table(5)
    user_error(caught.value, store.path, "3-dimensional", "not 5", "drop_knowledge")
    with pytest.raises(StoreError):
        store.upsert("knowledge", [_fact([1.0, 2.0])])  # wrong width
    with pytest.raises(StoreError):
        store.nearest([1.0, 2.0])

    store.drop_knowledge()
    store.knowledge_table(5)
    assert store.knowledge_dim() == 5 and store.count("knowledge") == 0


def test_knowledge_version_changes_on_every_write_and_on_re_create(store):
    assert store.knowledge_version() is None
    store.knowledge_table(2)
    created = store.knowledge_version()
    store.upsert("knowledge", [_fact([1.0, 0.0])])
    written = store.knowledge_version()
    assert len({created, written}) == 2
    assert store.knowledge_version() == written  # reading changes nothing

    store.drop_knowledge()
    store.knowledge_table(2)
    store.upsert("knowledge", [_fact([1.0, 0.0])])  # same lance version number as before
    assert store.knowledge_version() not in (created, written)


def test_knowledge_full_text_search(store, user_error):
    # The index is on character n-grams (1-3) for Japanese, so texts share no letters here.
    store.knowledge_table(2)
    tea = {**_fact([1.0, 0.0]), "fact_id": "likes-tea", "text": "絢音は毎朝紅茶を飲む"}
    cats = {**_fact([0.0, 1.0]), "fact_id": "cats", "text": "猫が二匹いる"}
    other = {**_fact([0.0, 1.0], persona="ren"), "text": "蓮も紅茶を飲む"}
    store.upsert("knowledge", [tea, cats, other])
    with pytest.raises(StoreError) as caught:
        store.search_knowledge_text("tea")
    user_error(caught.value, store.path, "no full-text index", "index_knowledge_text")

    store.index_knowledge_text()
    hits = store.search_knowledge_text("紅茶", limit=5, where=f"persona = {quote('aoi')}")
    assert [(h["id"], h["fact_id"]) for h in hits] == [(tea["id"], "likes-tea")]
    assert "vector" not in hits[0] and hits[0]["_score"] > 0
    assert store.search_knowledge_text("   ") == []
    assert store.search_knowledge_text("it's: (odd) \"query\"") == []  # punctuation is safe

    later = {**_fact([1.0, 1.0]), "text": "紅茶をこぼした"}
    store.upsert("knowledge", [later])  # written after the index: still found
    found = {h["id"] for h in store.search_knowledge_text("紅茶", where=f"persona = {quote('aoi')}")}
    assert found == {tea["id"], later["id"]}


def test_knowledge_snapshot_and_text_hits_read_one_version(store):
    assert store.knowledge_snapshot() == (None, [], 0)
    assert store.knowledge_text_hits("紅茶") == (None, [])
    store.knowledge_table(2)
    tea = {**_fact([1.0, 0.0]), "text": "絢音は毎朝紅茶を飲む"}
    other = {**_fact([0.0, 1.0], persona="ren"), "text": "蓮も紅茶を飲む"}
    store.upsert("knowledge", [tea, other])
    store.index_knowledge_text()
    where = f"persona = {quote('aoi')}"

    version, rows, total = store.knowledge_snapshot(where)
    assert version == store.knowledge_version()
    assert [r["id"] for r in rows] == [tea["id"]] and total == 2
    assert len(store.knowledge_snapshot()[1]) == 2  # no filter: every row

    version, hits = store.knowledge_text_hits("紅茶", 5, where)
    assert version == store.knowledge_version()
    assert hits == store.search_knowledge_text("紅茶", 5, where)
    assert {h["id"] for h in store.knowledge_text_hits("紅茶", 5)[1]} == {tea["id"], other["id"]}

    store.upsert("knowledge", [{**_fact([1.0, 1.0]), "text": "紅茶をこぼした"}])
    assert store.knowledge_text_hits("紅茶", 5, where)[0] != version  # sees the write
    assert store.knowledge_snapshot(where)[2] == 3
