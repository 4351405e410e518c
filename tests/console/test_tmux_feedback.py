"""Feedback in a real terminal (tmux, 80x24), on stand-in models behind real variants: rate a
reply, then a blind A/B round (names hidden, a vote, names shown); both end up in the store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from store import Store
from tests.conftest import REPO
from tests.console.test_tmux_e2e import home, screen, tmux, wait_for  # noqa: F401
from tests.inference.standin_backends import ENV, REPLY, write_standin_variant

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


def wait_closed(timeout: float = 30.0) -> None:
    """The console has quit: its tmux session is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = subprocess.run(["tmux", "-L", "kyara-test", "has-session", "-t", "k"],
                              capture_output=True, check=False).returncode != 0
        if gone:
            return
        time.sleep(0.2)
    raise AssertionError(f"the console never quit:\n{screen()}")


def test_rate_and_blind_vote_in_a_real_terminal(home, tmp_path):  # noqa: F811
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    for name in ("standin", "standin2"):
        write_standin_variant(configs, tmp_path, name)
    settings = configs / "kyara.yaml"
    text = settings.read_text(encoding="utf-8")
    assert "compare: []" in text
    settings.write_text(text.replace("compare: []", "compare: [standin, standin2]"),
                        encoding="utf-8")
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    command = (f"cd {REPO} && KYARA_HOME={home} KYARA_CONFIGS={configs} {env} "
               f"OPENAI_API_KEY= {sys.executable} -m console chat --variant standin")
    tmux("new-session", "-d", "-s", "k", "-x", "80", "-y", "24", command)
    wait_for(lambda s: "standin" in s and "Quit" in s)
    tmux("send-keys", "-t", "k", "こんにちは", "Enter")
    wait_for(lambda s: REPLY in s and "eos" in s, timeout=60)

    # rate the reply: personality 3, style 5, thumbs up
    tmux("send-keys", "-t", "k", "C-l")
    wait_for(lambda s: "rate this reply" in s)
    tmux("send-keys", "-t", "k", "35u", "Enter")
    rated = wait_for(lambda s: "personality you 3" in s and "style you 5" in s)
    assert "you 👍" in rated and REPLY in rated
    print(rated)

    # a blind round: two stand-ins, names hidden until the vote
    tmux("send-keys", "-t", "k", "C-b")
    wait_for(lambda s: "blind A/B" in s)
    tmux("send-keys", "-t", "k", "好きな花は？", "Enter")
    before = wait_for(lambda s: "which is better?" in s, timeout=60)
    assert "standin" not in before and before.count(REPLY) == 2
    print(before)
    tmux("send-keys", "-t", "k", "a")
    after = wait_for(lambda s: "(stored)" in s)
    assert "standin2" in after and "A ✓ · " in after and "you: A" in after
    print(after)
    tmux("send-keys", "-t", "k", "C-q")
    wait_closed()

    store = Store.open(home / "store")
    labels = {r["criterion"]: r["score"] for r in store.rows("labels")}
    assert labels == {"personality": 3, "style": 5, "thumbs": 2}
    [pref] = store.rows("preferences")
    assert pref["source"] == "human" and not pref["tie"]
    variants = json.loads(pref["variants_json"])
    assert {variants["chosen"], variants["rejected"]} == {"standin", "standin2"}
    chosen = store.get("messages", pref["chosen_id"])
    assert json.loads(chosen["options_json"])["blind"]["A"] == variants["chosen"]
