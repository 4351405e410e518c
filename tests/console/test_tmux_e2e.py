"""End to end in a real terminal (tmux, 80x24) on the packaged GGUF: type a Japanese
question, see the streamed reply and its badges, quit, resume."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from store import Store
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", "kyara-test", *args], capture_output=True, text=True,
                          check=False).stdout


def screen() -> str:
    return tmux("capture-pane", "-t", "k", "-p")


def wait_for(predicate, timeout=60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = screen()
        if predicate(text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"screen never matched:\n{screen()}")


def start(home, *args: str) -> None:
    command = (f"cd {REPO} && KYARA_HOME={home} {sys.executable} -m console chat "
               + " ".join(args))
    tmux("new-session", "-d", "-s", "k", "-x", "80", "-y", "24", command)


@pytest.fixture
def home(tmp_path):
    yield tmp_path / "home"
    tmux("kill-server")


def test_chat_resume_in_a_real_terminal(home):
    start(home)
    wait_for(lambda s: "ayane-270m" in s and "Quit" in s)  # the default variant
    tmux("send-keys", "-t", "k", "好きなミュージカルは？", "Enter")
    # the reply streams, then the style badges appear under it
    text = wait_for(lambda s: ("length" in s or "eos" in s) and ("✓" in s or "✗" in s),
                    timeout=120)
    assert "好きなミュージカルは？" in text and "小野寺絢音" in text
    assert "tok/s" in text  # the status line has the speed of the reply
    tmux("send-keys", "-t", "k", "C-q")
    time.sleep(1.5)
    store = Store.open(home / "store")
    sessions = store.rows("sessions")
    assert len(sessions) == 1
    rows = store.rows("messages")
    assert {(r["role"], r["status"]) for r in rows} == {("user", "complete"),
                                                       ("assistant", "complete")}
    tmux("kill-server")
    start(home, "--resume", sessions[0]["id"])
    text = wait_for(lambda s: "好きなミュージカルは？" in s)
    assert "小野寺絢音" in text
    tmux("send-keys", "-t", "k", "C-q")


def test_a_crashing_model_process_leaves_the_console_up(home, tmp_path):
    """The model's worker segfaults mid-reply (a stand-in that reads address 0, as llama.cpp's
    AMX path did): the console stays, names the crash in one line, and answers the next
    question from a fresh worker."""
    import shutil

    from tests.inference.standin_backends import REPLY, write_standin_variant

    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    write_standin_variant(configs, tmp_path)
    command = (f"cd {REPO} && KYARA_HOME={home} KYARA_CONFIGS={configs} "
               "KYARA_BACKEND_MODULES=gguf=tests.inference.standin_backends:CrashBackend "
               f"{sys.executable} -m console chat --variant standin")
    tmux("new-session", "-d", "-s", "k", "-x", "100", "-y", "30", command)
    wait_for(lambda s: "standin" in s and "Quit" in s)
    tmux("send-keys", "-t", "k", "crash now", "Enter")
    wait_for(lambda s: "SIGSEGV" in s, timeout=60)
    tmux("send-keys", "-t", "k", "こんにちは", "Enter")
    text = wait_for(lambda s: REPLY in s, timeout=60)
    assert "crash now" in text
    tmux("send-keys", "-t", "k", "C-q")
    time.sleep(1.5)
    rows = sorted(Store.open(home / "store").rows("messages"), key=lambda r: r["seq"])
    assert [(r["role"], r["status"]) for r in rows] == [
        ("user", "complete"), ("assistant", "error"), ("user", "complete"),
        ("assistant", "complete")]
