"""Data preparation: the fixes the lab's data needed, the report, and a source file that is
never written."""

from __future__ import annotations

import json
import unicodedata

import pytest

from pipelines.config import ConfigError
from pipelines.training.data import (
    PrepOptions,
    add_final_mark,
    clean_text,
    prepare,
    prepare_file,
    read_conversations,
)
from tests.conftest import run_kyara


def convo(reply: str, question: str = "元気？", id: str | None = None) -> dict:
    row = {"messages": [{"role": "user", "content": question},
                        {"role": "assistant", "content": reply}]}
    if id:
        row["id"] = id
    return row


@pytest.mark.parametrize("reply, expected", [
    ("元気ですわ", "元気ですわ。"),
    ("元気ですわ。", "元気ですわ。"),
    ("本当ですの！", "本当ですの！"),
    ("本当かしら？", "本当かしら？"),
    ("そうですわね…", "そうですわね…"),
    ("「レ・ミゼラブル」", "「レ・ミゼラブル」"),
    ("紅茶が好きですわ、", "紅茶が好きですわ。"),
    ("Hello there", "Hello there"),          # no Japanese: 。 would be wrong
    ("OK!", "OK!"),
    ("", ""),
])
def test_final_mark(reply, expected):
    assert add_final_mark(reply) == expected


def test_clean_text_nfc_whitespace_and_newlines():
    decomposed = unicodedata.normalize("NFD", "がんばりますわ")
    assert decomposed != "がんばりますわ"
    assert clean_text(f"  {decomposed}\n\n") == "がんばりますわ"
    assert clean_text("紅茶が\n好きですわ") == "紅茶が好きですわ"           # no space in Japanese
    assert clean_text("I like\n  tea") == "I like tea"                     # one between words
    assert clean_text("一行目。\r\n\r\n二行目。") == "一行目。二行目。"


def test_prepare_fixes_dedupes_filters_and_reports():
    rows = [
        convo("紅茶が\n好きですわ"),                 # newline, no 。
        convo("紅茶が好きですわ。"),                 # the same once fixed: a duplicate
        convo("嬉しいですわ！"),
        convo("「はい」"),
        convo("あ" * 200),                           # too long
        convo("Thank you"),
    ]
    original = json.dumps(rows, ensure_ascii=False)
    out, report = prepare(rows, PrepOptions(max_chars=120))
    assert json.dumps(rows, ensure_ascii=False) == original  # the input is not modified
    replies = [r["messages"][-1]["content"] for r in out]
    assert replies == ["紅茶が好きですわ。", "嬉しいですわ！", "「はい」", "Thank you"]
    assert report.changes["dropped_duplicate"] == 1
    assert report.changes["dropped_too_long"] == 1
    assert report.changes["final_mark_added"] == 1
    assert report.changes["newlines_collapsed"] == 1
    assert report.before.conversations == 6 and report.after.conversations == 4
    assert report.before.ending_maru == pytest.approx(1 / 6)
    assert report.after.ending_maru == pytest.approx(1 / 4)
    assert report.before.with_newlines == pytest.approx(1 / 6)
    assert report.after.with_newlines == 0
    assert sum(report.after.histogram.values()) == 4
    text = report.text()
    assert "ending with 。" in text and "histogram" in text


def test_prepare_file_never_touches_the_source(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(convo("元気ですわ\n"), ensure_ascii=False) + "\n",
                      encoding="utf-8")
    before = source.read_bytes()
    report = prepare_file(source, tmp_path / "out.jsonl")
    assert source.read_bytes() == before
    assert read_conversations(tmp_path / "out.jsonl")[0]["messages"][-1]["content"] == "元気ですわ。"
    assert report.after.ending_maru == 1.0
    with pytest.raises(ConfigError, match="source"):
        prepare_file(source, source)
    assert source.read_bytes() == before


def test_bad_file_is_one_line_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}]}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: .*assistant"):
        read_conversations(path)


def test_cli_prep(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(convo(r), ensure_ascii=False) + "\n"
                              for r in ["元気ですわ", "元気ですわ", "はい！"]), encoding="utf-8")
    result = run_kyara("data", "prep", str(source), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "ending with 。" in result.stdout
    assert "dropped_duplicate 1" in result.stdout
    assert len(read_conversations(tmp_path / "out.jsonl")) == 2
    same = run_kyara("data", "prep", str(source), "-o", str(source))
    assert same.returncode == 2 and "never modified" in same.stderr
