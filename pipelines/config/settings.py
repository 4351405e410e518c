"""configs/kyara.yaml: the application's settings and the console's keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.config.base import DEFAULT_JUDGE, DEFAULT_PERSONA, Strict
from pipelines.home import Home


def _key(default: str, what: str) -> Any:
    return Field(default, description=what)


class Keymap(Strict):
    """Keys of the console; ids match the Textual Binding ids."""

    send: str = _key("enter", "send the message")
    cancel: str = _key("escape", "stop the reply being generated")
    toggle_rag: str = _key("ctrl+r", "retrieval on / off")
    switch_variant: str = _key("ctrl+t", "chat with another variant")
    compare: str = _key("ctrl+k", "the Compare screen")
    jobs: str = _key("ctrl+j", "the jobs screen")
    # not ctrl+h: many terminals send it for Backspace
    history: str = _key("ctrl+g", "the history screen")
    copy_reply: str = _key("ctrl+y", "copy the selected exchange (OSC 52)")
    export: str = _key("ctrl+o", "the conversation as a Markdown file")
    toggle_side: str = _key("ctrl+s", "show / hide the details panel")
    quit: str = _key("ctrl+q", "leave the console")
    # feedback on the selected reply (issue 16)
    regenerate: str = _key("ctrl+n", "another reply to the selected turn")
    prev_alternative: str = _key("left", "the previous alternative of the selected reply "
                                 "(select with Tab / shift+Tab / click)")
    next_alternative: str = _key("right", "the next alternative of the selected reply")
    edit_reply: str = _key("f2", "open the reply editor; pressed again, save")
    rate_reply: str = _key("ctrl+l", "open the rating panel")
    thumbs_up: str = _key("u", "thumbs up, in the rating panel")
    thumbs_down: str = _key("d", "thumbs down, in the rating panel")
    blind_compare: str = _key("ctrl+b", "the blind A/B screen")
    vote_a: str = _key("a", "blind A/B: A is better (once both replies are in)")
    vote_b: str = _key("b", "blind A/B: B is better")
    vote_tie: str = _key("t", "blind A/B: a tie")
    # the Reports screens (issues 15, 16)
    report_next_chart: str = _key("c", "Reports: the next chart")
    reports_arena: str = _key("a", "Reports: the Arena screen")
    arena_refresh: str = _key("r", "Arena: read the votes and verdicts again")


class AppSettings(Strict):
    """configs/kyara.yaml. `KYARA_HOME` and `KYARA_STORE` override home and store."""

    home: str = Field("~/.local/share/kyara", description="where runs, models, evals and "
                      "logs go (~ and $VARS expanded); KYARA_HOME overrides it")
    store: str | None = Field(None, description="LanceDB directory; default <home>/store")
    default_persona: str = Field(DEFAULT_PERSONA, description="the persona chat starts with")
    default_variant: str = Field("ayane-270m", description="the variant chat starts with")
    default_judge: str | None = Field(DEFAULT_JUDGE, description="the judge config the "
                                      "console scores replies with; unset: none")
    rag: bool = Field(False, description="retrieval on when chat starts")
    compare: list[str] = Field(
        default_factory=list,
        description="combinations for Compare, e.g. [base, base+rag, tuned, tuned+rag]; "
                    "empty = current and first fine-tuned variant x retrieval off/on",
    )
    llama_cpp_dir: str | None = Field(
        None, description="a llama.cpp checkout whose convert_hf_to_gguf.py to use"
    )
    keymap: Keymap = Field(Keymap(), description="the console's keys")

    def home_path(self) -> Path:
        return Path(os.path.expandvars(self.home)).expanduser()

    def store_path(self) -> Path:
        return (
            Path(os.path.expandvars(self.store)).expanduser()
            if self.store
            else Home(self.home_path()).store
        )


def apply_env(settings: AppSettings, env: dict[str, str] | None = None) -> AppSettings:
    env = dict(os.environ if env is None else env)
    update: dict[str, Any] = {}
    if env.get("KYARA_HOME"):
        update["home"] = env["KYARA_HOME"]
    if env.get("KYARA_STORE"):
        update["store"] = env["KYARA_STORE"]
    return settings.model_copy(update=update)
