"""The `index` job: embed a persona's knowledge.jsonl into the store (full-text + vectors).

The same work as `kyara index`, as a job: it can run detached and report to the console.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from pipelines import events as ev
from pipelines.config import ConfigError, IndexJob, KnowledgeFact, load_jsonl
from pipelines.events import Event
from pipelines.jobs import JobContext


def run(cfg: IndexJob, ctx: JobContext) -> Iterator[Event]:
    started = time.perf_counter()
    yield ev.start("index", cfg.name, f"persona {cfg.persona}, embedder {cfg.embedder}")

    yield ev.stage("load", "reading the persona's knowledge")
    persona = ctx.workspace.persona(cfg.persona)  # checks persona.yaml and its id
    path = ctx.workspace.persona_dir(cfg.persona) / "knowledge.jsonl"
    if not path.is_file():
        # Indexing nothing would delete every stored fact of the persona: refuse instead.
        raise ConfigError(f"{path}: no such file (the persona's facts to index)")
    facts = load_jsonl(path, KnowledgeFact)
    yield ev.log(f"{len(facts)} facts in {path}")
    ctx.check_cancelled()

    yield ev.stage("embedder", f"loading {cfg.embedder}")
    from pipelines.retrieval import build_notice, get_embedder  # no torch here
    from pipelines.retrieval.opening import index_facts

    notice = build_notice(cfg.embedder, ctx.workspace.settings.home_path())
    if notice:
        yield ev.log(notice)

    embedder = get_embedder(cfg.embedder, ctx.workspace.settings.home_path())
    ctx.check_cancelled()

    yield ev.stage("index", "embedding new and changed facts, removing stale ones")
    # index_persona embeds in one batch, so progress can only say "begun" and "finished".
    yield ev.progress(0, len(facts), "facts", stage="index")
    # as `kyara index` does: with the asks `kyara index --generate-asks` cached
    report = index_facts(ctx.store, persona.id, facts, ctx.home, embedder, rebuild=cfg.rebuild)
    yield ev.progress(len(facts), len(facts), "facts", stage="index")

    yield ev.metric("facts_indexed", report.added + report.updated, stage="index")
    yield ev.metric("seconds", report.seconds, stage="index")
    yield ev.done({
        "persona": report.persona,
        "embedder": report.embedder,
        "facts": len(facts),
        "added": report.added,
        "updated": report.updated,
        "removed": report.removed,
        "unchanged": report.unchanged,
        "seconds": round(time.perf_counter() - started, 3),
    })
