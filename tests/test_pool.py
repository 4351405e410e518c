"""One owner of loaded backends (pipelines/pool.py): chat, compare and blind A/B ask the
same BackendPool, so a variant is loaded once, and closing it closes each backend once.
And nothing tells a backend from a factory by sniffing for `stream`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipelines.chat import ChatSession, Combo, TurnDone, compare
from pipelines.inference.base import BackendError
from pipelines.pool import BackendPool
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS
from tests.console.test_chat_app import ScriptedBackend

ROOT = Path(__file__).resolve().parent.parent


class Closing(ScriptedBackend):
    def __init__(self, name):
        super().__init__([[f"{name}ですわ。"]] * 8)
        self.closed = 0

    def close(self):
        self.closed += 1


@pytest.fixture
def ws():
    return Workspace.load(CONFIGS)


def counting_pool():
    loaded: list[str] = []
    made: list[Closing] = []

    def loader(variant):
        loaded.append(variant.name)
        made.append(Closing(variant.name))
        return made[-1]

    return BackendPool(loader), loaded, made


def test_two_sessions_and_a_comparison_on_one_variant_load_it_once(ws, tmp_path):
    store = Store.open(tmp_path / "store")
    pool, loaded, made = counting_pool()
    persona, a, b = ws.persona("ayane"), ws.variant("gemma3-270m"), ws.variant(
        "gemma-2-2b-jpn-it")
    chat = ChatSession(store=store, persona=persona, variant=a, pool=pool)
    other = ChatSession(store=store, persona=persona, variant=a, pool=pool)
    assert chat.variant.name not in pool  # nothing is loaded before a turn needs it
    list(chat.send("こんにちは"))
    list(other.send("こんばんは"))
    chat.use(b)  # switching keeps the first loaded
    list(chat.send("もう一度"))
    session = ChatSession(store=store, persona=persona, variant=a, pool=pool, kind="compare")
    done = [e.message for _, e in compare(session, "犬は？", [Combo(a, False), Combo(b, False)])
            if isinstance(e, TurnDone)]
    assert [row["status"] for row in done] == ["complete", "complete"]
    assert loaded == [a.name, b.name]  # each variant loaded once, for every party
    assert pool.loaded(a.name) is made[0] and pool.loaded(b.name) is made[1]
    pool.close()
    assert [m.closed for m in made] == [1, 1]
    pool.close()  # a second close closes nothing again
    assert [m.closed for m in made] == [1, 1]


def test_a_given_backend_joins_the_pool_and_is_closed_once(ws, tmp_path):
    store = Store.open(tmp_path / "store")
    pool, loaded, _ = counting_pool()
    given = Closing("given")
    session = ChatSession(store=store, persona=ws.persona("ayane"),
                          variant=ws.variant("gemma3-270m"), backend=given)
    session.share(pool)
    pool.adopt("alias", given)  # one backend under two names is still one backend
    list(session.send("こんにちは"))
    assert loaded == [] and pool.loaded("gemma3-270m") is given
    pool.close()
    assert given.closed == 1


def test_a_failed_load_caches_nothing_and_a_pool_without_loader_says_so(ws):
    calls = []

    def loader(variant):
        calls.append(variant.name)
        raise BackendError(f"variant {variant.name!r}: model file not found")

    pool = BackendPool(loader)
    variant = ws.variant("gemma3-270m")
    for _ in range(2):
        with pytest.raises(BackendError, match="model file not found"):
            pool.get(variant)
    assert calls == [variant.name] * 2 and variant.name not in pool
    with pytest.raises(BackendError, match="nothing to load one with"):
        BackendPool().get(variant)


def stream_sniffs(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "hasattr" and len(node.args) == 2
                and isinstance(node.args[1], ast.Constant) and node.args[1].value == "stream"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_nothing_tells_a_backend_from_a_factory_by_sniffing_for_stream():
    found = [hit for wing in ("console", "pipelines")
             for path in sorted((ROOT / wing).rglob("*.py")) for hit in stream_sniffs(path)]
    assert found == []
