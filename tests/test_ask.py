"""`kyara ask` end to end on the embedded GGUF: the reply streams to stdout, stop reason and
speed to stderr, both turns in the store; a missing model is one line and keeps the question."""

import pytest

from store import Store
from tests.conftest import REPO, run_kyara
from tests.inference.standin_backends import ENV as STANDIN_ENV
from tests.inference.standin_backends import write_standin_variant


def _messages(home):
    store = Store.open(home / "store")
    return sorted(store.rows("messages"), key=lambda r: (r["created_at"], r["seq"]))


def test_ask_streams_and_logs_the_turn(tmp_path):
    proc = run_kyara("ask", "好きなミュージカルは？", "--temperature", "0",
                     "--max-new-tokens", "8", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "no reply on stdout"
    assert "stop: " in proc.stderr and "tok/s" in proc.stderr
    assert "llama_" not in proc.stderr  # llama.cpp's own log lines stay off the terminal
    rows = _messages(tmp_path / "home")
    assert [(r["role"], r["status"]) for r in rows] == [("user", "complete"),
                                                       ("assistant", "complete")]
    reply = rows[1]
    assert reply["content"].strip() == proc.stdout.strip()
    assert reply["variant"] == "ayane-270m" and reply["completion_tokens"] <= 8  # the default
    assert reply["stop_reason"] in ("length", "eos")
    assert reply["rendered_prompt"].startswith("<bos><start_of_turn>user\nお嬢様のように")


def test_ask_with_a_missing_model_keeps_the_question(tmp_path):
    configs = tmp_path / "configs"
    import shutil

    shutil.copytree(REPO / "configs", configs)
    (configs / "models" / "lost.yaml").write_text(
        "name: lost\nbackend: gguf\npath: /nonexistent/model.gguf\nchat_template: gemma\n",
        encoding="utf-8")
    proc = run_kyara("ask", "こんにちは", "--variant", "lost", "--configs", str(configs))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model file not found: /nonexistent/model.gguf" in lines[0]
    assert "Traceback" not in proc.stderr
    rows = _messages(tmp_path / "home")
    assert rows[0]["role"] == "user" and rows[0]["content"] == "こんにちは"
    assert rows[1]["status"] == "error" and "not found" in rows[1]["error"]


@pytest.mark.parametrize("args, expect", [
    (["--rag"], "not indexed (run: kyara index ayane)"),
    (["--persona", "nobody"], "persona 'nobody' not found"),
])
def test_ask_bad_requests_are_one_line(args, expect):
    proc = run_kyara("ask", "こんにちは", *args)
    assert proc.returncode == 2
    assert expect in proc.stderr and "Traceback" not in proc.stderr


def test_ask_against_a_crashing_model_process_is_exit_1_and_one_line(tmp_path):
    """The model's worker segfaults mid-reply: `kyara ask` itself is no bare segfault
    (exit 139); it says which variant died of what, in one line, and keeps both turns."""
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    write_standin_variant(configs, tmp_path)
    proc = run_kyara("ask", "crash now", "--variant", "standin", "--configs", str(configs),
                     env=STANDIN_ENV)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "variant 'standin'" in lines[0] and "killed by SIGSEGV" in lines[0]
    assert proc.stdout.startswith("ごきげん")  # what streamed before the crash was shown
    rows = _messages(tmp_path / "home")
    assert rows[0]["content"] == "crash now"
    assert rows[1]["status"] == "error" and rows[1]["content"] == "ごきげん"


def test_ask_never_writes_a_replys_control_sequences(tmp_path):
    """A remote variant's reply holding OSC 52 (set the clipboard), a C1 CSI and NEL reaches
    stdout as visible text: the bytes never reach the terminal."""
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    write_standin_variant(configs, tmp_path)
    hostile = "ごきげんよう\x1b]52;c;ZXZpbA==\x07\x9b31m\x85\x7fです。"
    proc = run_kyara("ask", "こんにちは", "--variant", "standin", "--configs", str(configs),
                     "--max-new-tokens", "64",
                     env={**STANDIN_ENV, "KYARA_STANDIN_REPLY": hostile})
    assert proc.returncode == 0, proc.stderr
    for byte in ("\x1b", "\x07", "\x9b", "\x85", "\x7f"):
        assert byte not in proc.stdout and byte not in proc.stderr
    assert proc.stdout.strip() == ("ごきげんよう\\x1b]52;c;ZXZpbA==\\x07\\x9b31m\\x85\\x7fです。")
    reply = _messages(tmp_path / "home")[1]
    assert reply["content"] == hostile  # the store keeps what the model said
