"""The one way to reach a persona's indexed facts: `find_retriever` (None when the persona
is not indexed: chat, where retrieval is optional), `open_retriever` (the retriever or a
one-line refusal; a job that retrieves names itself in `needed_by` and gets the persona's
knowledge.jsonl indexed first, once, when it is not yet), and `index_facts`, the indexing
`kyara index`, the index job and that first indexing share (the embedder, the asks
generated earlier from their cache)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, IndexJob, KnowledgeFact, load_jsonl
from pipelines.retrieval import (
    DEFAULT_EMBEDDER,
    Embedder,
    IndexReport,
    Retriever,
    asks,
    get_embedder,
    index_persona,
)
from store import Store
from store.sql import quote


def find_retriever(store: Store, persona: str, home: Path | None = None) -> Retriever | None:
    """A Retriever over the persona's indexed facts, with the embedder they were indexed
    with (built embedders live under `home`); None when the persona has not been indexed."""
    if store.knowledge_dim() is None:
        return None
    indexed = store.rows("knowledge", where=f"persona = {quote(persona)}", limit=1)
    if not indexed:
        return None
    return Retriever(store, persona, get_embedder(indexed[0]["embedder"], home))


def index_facts(store: Store, persona: str, facts: Sequence[KnowledgeFact], home: Path,
                embedder: str | Embedder = DEFAULT_EMBEDDER, *,
                rebuild: bool = False) -> IndexReport:
    """The persona's facts into the store's knowledge table with `embedder` (a name, or
    one loaded already), each with the questions generated for it earlier (`kyara index
    --generate-asks`, cached under the home)."""
    loaded = get_embedder(embedder, home) if isinstance(embedder, str) else embedder
    generated = asks.cached_asks(facts, asks.cache_path(home, persona))
    return index_persona(store, persona, facts, loaded, rebuild=rebuild, asks=generated)


def index_if_needed(store: Store, workspace: Any, persona: str, home: Path,
                    needed_by: str) -> str | None:
    """The persona's knowledge.jsonl indexed when it is not yet (once, with the index job's
    default embedder: what `kyara index` would do), for a job that retrieves (the eval job,
    the train job's rag_share). Returns a note saying it indexed now, else None;
    ConfigError, naming `needed_by`, when the persona has no facts."""
    if find_retriever(store, persona, home) is not None:
        return None
    return _index_file(store, workspace, persona, home, needed_by)


def _index_file(store: Store, workspace: Any, persona: str, home: Path, needed_by: str) -> str:
    path = workspace.persona_dir(persona) / "knowledge.jsonl"
    if not path.is_file():
        raise ConfigError(f"{needed_by} needs the persona's facts, and {path} does not exist")
    embedder = IndexJob(job="index", name=f"index-{persona}").embedder
    index_facts(store, persona, load_jsonl(path, KnowledgeFact), home, embedder)
    return (f"retrieval: persona {persona} was not indexed; indexed {path.name} with "
            f"{embedder} (once)")


def open_retriever(store: Store, persona: str, home: Path, *, workspace: Any = None,
                   needed_by: str | None = None) -> tuple[Retriever, str | None]:
    """The persona's retriever (one, with the embedder its facts were indexed with) and a
    note when it was indexed just now. With `needed_by` and the workspace, a persona not
    indexed yet is indexed first (as `index_if_needed`); without, it is refused:
    ConfigError, one line, saying to run `kyara index`."""
    retriever = find_retriever(store, persona, home)
    if retriever is not None:
        return retriever, None
    if needed_by is None or workspace is None:
        raise ConfigError(f"persona '{persona}' is not indexed (run: kyara index {persona})")
    note = _index_file(store, workspace, persona, home, needed_by)
    retriever = find_retriever(store, persona, home)
    if retriever is None:  # indexed, yet nothing to find
        raise ConfigError(f"{needed_by}: persona {persona}'s knowledge.jsonl holds no facts "
                          "to retrieve")
    return retriever, note
