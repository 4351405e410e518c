"""events.jsonl: every event type survives the round trip; a tail reads complete lines only,
steps over corrupt ones, and can start again from 0 (re-attaching)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pipelines import events as ev
from pipelines.events import Event, EventWriter, Tailer, parse_line, read_events

ALL = [
    ev.start("index", "index-tiny", "persona ayane"),
    ev.stage("embed", "embedding 5 facts"),
    ev.progress(3, 5, "facts", stage="embed"),
    ev.progress(7),  # total unknown
    ev.metric("loss", 0.25, step=10),
    ev.log("絢音の知識を読み込みました"),
    ev.log("disk almost full", level="warning"),
    ev.error("exception", "RuntimeError: boom\n  at line 3"),
    ev.done({"added": 5, "nested": {"a": [1, 2]}}),
]


def test_round_trip_every_type(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path, run_id="r1") as writer:
        for event in ALL:
            writer.write(event)
    got, offset = read_events(path)
    assert offset == path.stat().st_size
    assert [e.model_dump() for e in got] == [
        e.model_copy(update={"run_id": "r1"}).model_dump() for e in ALL]
    text = path.read_text(encoding="utf-8")
    assert "絢音" in text  # not \\u-escaped: the file stays legible
    assert len(text.splitlines()) == len(ALL)
    assert '"current":3,' in text and "null" not in text  # ints stay ints; no empty fields
    assert got[7].message == "RuntimeError: boom at line 3"  # errors are one line
    assert got[6].level == "warning" and got[5].level == "info"


def test_each_type_needs_its_fields():
    for bad in ({"type": "metric", "name": "loss"}, {"type": "progress"},
                {"type": "error", "message": "x"}, {"type": "log"}, {"type": "stage"},
                {"type": "nope"}, {"type": "log", "message": "x", "colour": "red"}):
        with pytest.raises(ValidationError):
            Event.model_validate(bad)


def test_terminal_events_are_fsynced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(ev.os, "fsync", synced.append)
    with EventWriter(tmp_path / "events.jsonl") as writer:
        writer.write(ev.progress(1, 2))
        writer.write(ev.log("x"))
        assert synced == []
        writer.write(ev.done())
    assert len(synced) == 1


def test_partial_last_line_waits_until_complete(tmp_path):
    path = tmp_path / "events.jsonl"
    first = ev.stage("one").to_json() + "\n"
    second = ev.metric("loss", 1.5).to_json() + "\n"
    path.write_bytes((first + second[:10]).encode())
    got, offset = read_events(path)
    assert [e.stage for e in got] == ["one"] and offset == len(first.encode())
    assert read_events(path, offset) == ([], offset)  # still partial: nothing consumed
    with open(path, "ab") as fh:
        fh.write(second[10:].encode())
    got, offset = read_events(path, offset)
    assert [e.name for e in got] == ["loss"] and offset == path.stat().st_size


def test_partial_utf8_character_is_not_split(tmp_path):
    path = tmp_path / "events.jsonl"
    line = ev.log("絢音").to_json().encode() + b"\n"
    cut = line.index("絢".encode()) + 1  # in the middle of a 3-byte character
    path.write_bytes(line[:cut])
    assert read_events(path) == ([], 0)
    with open(path, "ab") as fh:
        fh.write(line[cut:])
    assert read_events(path)[0][0].message == "絢音"


def test_corrupt_lines_are_skipped_and_noted(tmp_path):
    path = tmp_path / "events.jsonl"
    good = ev.stage("a").to_json().encode()
    lines = [good, b"{not json", b"", b'{"type": "bogus"}', b"[1, 2]", b"\xff\xfe{}", good]
    path.write_bytes(b"\n".join(lines) + b"\n")
    got, offset = read_events(path)
    assert offset == path.stat().st_size
    assert [e.type for e in got] == ["stage", "log", "log", "log", "log", "stage"]
    notes = got[1:5]
    assert all(n.level == "warning" and "corrupt line" in n.message for n in notes)
    assert f"at byte {len(good) + 1}:" in notes[0].message  # where to look


def test_unknown_keys_from_a_newer_writer_are_ignored():
    event = parse_line(json.dumps({"type": "metric", "name": "x", "value": 1, "gpu": 3}))
    assert event.name == "x" and event.value == 1.0


def test_writer_after_a_fragment_starts_a_fresh_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"type": "sta')  # a writer killed mid-line
    with EventWriter(path) as writer:
        writer.write(ev.error("cancelled", "cancelled (SIGTERM)"))
    got, _ = read_events(path)
    assert [e.type for e in got] == ["log", "error"]  # the fragment is noted, not lost with it


def test_tailer_follows_and_reattaches_from_zero(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = Tailer(path)
    assert tail.poll() == [] and not tail.finished  # no file yet
    with EventWriter(path, run_id="r") as writer:
        writer.write(ev.start("index", "n"))
        assert [e.type for e in tail.poll()] == ["start"]
        writer.write(ev.progress(1, 2))
        writer.write(ev.done({"added": 5}))
    assert [e.type for e in tail.poll()] == ["progress", "done"]
    assert tail.finished and tail.last_terminal.summary == {"added": 5}
    assert tail.poll() == []
    again = Tailer(path)  # a restarted console
    assert [e.type for e in again.poll()] == ["start", "progress", "done"]


def test_a_replaced_shorter_file_is_read_again(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as writer:
        for i in range(5):
            writer.write(ev.progress(i))
    _, offset = read_events(path)
    path.write_text(ev.stage("new").to_json() + "\n", encoding="utf-8")
    got, new_offset = read_events(path, offset)
    assert [e.type for e in got] == ["log", "stage"] and new_offset == path.stat().st_size


def test_last_event_reads_only_the_end(tmp_path):
    path = tmp_path / "events.jsonl"
    assert ev.last_event(path) is None
    with EventWriter(path) as writer:
        for i in range(2000):
            writer.write(ev.progress(i, 2000))
        writer.write(ev.done({"n": 1}))
    with open(path, "ab") as fh:
        fh.write(b"{half a li")  # being written: not the last event yet
    assert ev.last_event(path, window=1024).summary == {"n": 1}


def test_a_diverging_loss_is_still_an_event(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as writer:
        writer.write(ev.metric("loss", float("nan"), step=3))
        writer.write(ev.metric("grad_norm", float("inf")))
    got, _ = read_events(path)
    assert got[0].value != got[0].value and got[1].value == float("inf")
