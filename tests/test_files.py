"""pipelines/files.py, the one owner of writes, appends, renames and JSON Lines reads: the
umask's mode, one torn-line rule, records split on "\\n" only, a byte order mark accepted;
and no other module renaming files by hand."""

from __future__ import annotations

import ast
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from pipelines import files
from tests.conftest import REPO

LS = "\u2028"  # LINE SEPARATOR: str.splitlines splits on it, JSON keeps it raw (ensure_ascii off)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- modes -------------------------------------------------------------------------------


def test_results_json_has_the_mode_of_a_file_files_writes(tmp_path, umask_022):
    from pipelines.evaluation import write_results

    written = write_results({"meta": {}, "headline": []}, tmp_path / "run")
    plain = files.write_atomic(tmp_path / "plain.txt", "x\n")
    assert mode(written) == mode(plain) == 0o644  # not mkstemp's 0600
    assert json.loads(written.read_text(encoding="utf-8")) == {"meta": {}, "headline": []}
    appended = tmp_path / "log.jsonl"
    files.append_jsonl(appended, {"a": 1})
    assert mode(appended) == 0o644
    assert mode(files.write_bytes_atomic(tmp_path / "blob.bin", b"\0")) == 0o644


def test_replace_folder_renames_only(tmp_path):
    target, new = tmp_path / "out", tmp_path / ".out.partial"
    target.mkdir()
    (target / "old.txt").write_text("old", encoding="utf-8")
    new.mkdir()
    (new / "new.txt").write_text("new", encoding="utf-8")
    files.replace_folder(new, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone
    files.replace_folder(tmp_path / "out", tmp_path / "fresh")  # nothing there before
    assert (tmp_path / "fresh" / "new.txt").is_file()


# --- the torn-line rule ------------------------------------------------------------------


def test_an_append_after_a_torn_line_keeps_the_next_record(tmp_path):
    from pipelines.jobs.eval import _append, read_replies

    path = tmp_path / "replies.jsonl"
    _append(path, {"id": "a", "text": "one"})
    with open(path, "ab") as fh:  # a kill mid-write: half a record, no newline
        fh.write(b'{"id": "b", "te')
    _append(path, {"id": "c", "text": "three"})
    assert sorted(read_replies(path)) == ["a", "c"]
    assert path.read_bytes().endswith(b'{"id": "b", "te\n{"id": "c", "text": "three"}\n')


def test_events_and_logs_share_the_rule(tmp_path):
    from pipelines import events as ev

    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"type": "log", "mess')
    assert files.ends_mid_line(path)
    with ev.EventWriter(path) as writer:
        writer.write(ev.log("after"))
    kept = [e for e in ev.iter_events(path) if e.message == "after"]
    assert len(kept) == 1 and not files.ends_mid_line(path)
    assert not files.ends_mid_line(tmp_path / "missing.jsonl")


def test_a_log_that_refuses_corrupt_lines_drops_the_fragment(tmp_path):
    path = tmp_path / "evaluations.jsonl"
    path.write_bytes(b'{"index": 0}\n{"ind')
    assert files.drop_torn_tail(path) == b'{"index": 0}\n'
    assert path.read_bytes() == b'{"index": 0}\n'
    assert files.drop_torn_tail(tmp_path / "missing") == b""


# --- reading JSON Lines ------------------------------------------------------------------


def test_records_split_on_newline_only():
    text = json.dumps({"t": f"a{LS}b\u2029c\u0085d"}, ensure_ascii=False) + "\r\n" + "{}\n"
    assert len(text.splitlines()) > 2  # what the readers used to do
    lines = files.jsonl_lines(text)
    assert [json.loads(line) for line in lines] == [{"t": f"a{LS}b\u2029c\u0085d"}, {}]
    assert files.jsonl_lines("") == [] and files.jsonl_lines("{}") == ["{}"]


def test_a_bom_prefixed_jsonl_file_loads(tmp_path):
    from pipelines.config import iter_jsonl
    from pipelines.training.data import read_conversations

    path = tmp_path / "dialogues.jsonl"
    row = {"messages": [{"role": "user", "content": "こんにちは"},
                        {"role": "assistant", "content": "ごきげんよう。"}]}
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row, ensure_ascii=False) + "\n").encode())
    assert read_conversations(path) == [row]
    assert [value for _, _, value in iter_jsonl(path)] == [row]
    assert [json.loads(line) for line in files.read_jsonl_lines(path)] == [row]


def test_a_line_separator_in_a_reply_survives_export_into_the_train_job(tmp_path, monkeypatch):
    from console.cli import app
    from pipelines.training.data import read_conversations
    from store import Store, new_id, utcnow

    home = tmp_path / "home"
    monkeypatch.setenv("KYARA_HOME", str(home))
    store = Store.open(home / "store")
    sid = new_id()
    store.upsert("sessions", [{"id": sid, "persona": "ayane", "variant": "v1", "kind": "chat"}])
    reply = f"一行目{LS}二行目\u2029三行目"
    for seq, role, content in ((0, "user", "こんにちは"), (1, "assistant", reply)):
        store.upsert("messages", [{"id": new_id(), "session_id": sid, "seq": seq, "role": role,
                                   "content": content, "status": "complete",
                                   "created_at": utcnow(), "variant": "v1",
                                   "rendered_prompt": "<r>"}])
    out = tmp_path / "sft.jsonl"
    result = CliRunner().invoke(app, ["data", "export", "sft", "-o", str(out)],
                                env={"COLUMNS": "160"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert LS in out.read_text(encoding="utf-8")  # written raw, as kyara's writers do
    [row] = read_conversations(out)  # what the train job reads
    assert row["messages"][-1]["content"] == reply


def test_a_reply_with_a_line_separator_is_not_asked_again(tmp_path):
    from pipelines.jobs.eval import _append, read_replies

    path = tmp_path / "replies.jsonl"
    _append(path, {"id": "r1", "text": f"a{LS}b"})
    assert read_replies(path)["r1"]["text"] == f"a{LS}b"


# --- only files.py renames ---------------------------------------------------------------

# store/ cannot import pipelines/; it renames nothing today (a lock file only), so nothing
# there is exempt.
ALLOWED = {"pipelines/files.py"}
_MODULE_CALLS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move"),
                 ("tempfile", "mkstemp"), ("tempfile", "NamedTemporaryFile")}


def _renames(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that rename or replace a path: os.replace / os.rename / shutil.move (also
    imported by name), mkstemp / NamedTemporaryFile, and a `.replace(x)` / `.rename(x)`
    method call with one positional argument and no keywords (Path's; str.replace takes
    two, datetime.replace keywords only)."""
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module in {"os", "shutil", "tempfile"}
                for alias in node.names if (node.module, alias.name) in _MODULE_CALLS}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in imported:
            found.append((node.lineno, func.id))
        elif isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if (owner, func.attr) in _MODULE_CALLS:
                found.append((node.lineno, f"{owner}.{func.attr}"))
            elif (func.attr in {"replace", "rename"} and len(node.args) == 1
                  and not node.keywords):
                found.append((node.lineno, f".{func.attr}({ast.unparse(node.args[0])})"))
    return found


def test_the_check_tells_a_path_rename_from_str_replace():
    code = ("import os, shutil\nfrom os import replace as r\n"
            "os.replace(a, b); p.rename(q); p.replace(q); shutil.move(a, b); r(a, b)\n"
            "s.replace('a', 'b'); d.replace(tzinfo=z); s.replace(x, y, 1)\n")
    assert [what for _, what in _renames(ast.parse(code))] == [
        "os.replace", ".rename(q)", ".replace(q)", "shutil.move", "r"]


def test_only_files_py_renames_files():
    offenders = []
    for wing in ("console", "pipelines", "store"):
        for path in sorted((REPO / wing).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in ALLOWED:
                continue
            for line, what in _renames(ast.parse(path.read_text(encoding="utf-8"))):
                offenders.append(f"{rel}:{line}: {what}")
    assert offenders == [], "rename through pipelines.files instead:\n" + "\n".join(offenders)
