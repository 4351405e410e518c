"""Questions a fact answers, generated once per fact by the configured judge model over
its OpenAI-compatible API, so that a question worded unlike the fact still finds it.

- Cached by the fact's hash (its text and this prompt's version) in
  `<home>/asks/<persona>.json`: a fact is asked about once; an edited fact is asked again.
  The file is plain JSON, shown by `kyara index --explain` and editable by hand.
- Indexing never needs the model: it reads what the cache holds (and the facts' own
  `asks:` in knowledge.jsonl). Only `kyara index --generate-asks` asks the judge.
- A failed or unreadable answer leaves that fact without generated asks (said in the
  report), never stops the indexing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, KnowledgeFact
from pipelines.files import write_atomic
from pipelines.home import Home

PROMPT_VERSION = 1
ASKS_PER_FACT = 5
PROMPT = """あなたは検索システムのために、ユーザーが実際にしそうな質問を書く係です。
次の事実は、キャラクター「{name}」についてのものです。この事実が答えになる質問を{n}個、
ユーザーがキャラクター本人に話しかける口調で書いてください（くだけた口調、丁寧な口調、
遠回しな聞き方を混ぜる）。事実の文の言葉をなるべく使わず、ユーザー自身の言葉で書くこと。
JSON の文字列の配列だけを出力してください。

事実: {text}"""
_ARRAY = re.compile(r"\[.*\]", re.DOTALL)
_LINE_PREFIX = re.compile(r"^\s*(?:[-*・•]|\d+[.)．）])\s*")


def fact_key(fact: KnowledgeFact) -> str:
    """What the cache is keyed by: the fact's text and the prompt's version."""
    return hashlib.sha256(f"{PROMPT_VERSION}\x00{fact.text}".encode()).hexdigest()[:32]


def cache_path(home: Path, persona: str) -> Path:
    return Home(home).asks / f"{persona}.json"


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable asks cache ({exc}); fix or delete it"
                          ) from None
    return data if isinstance(data, dict) else {}


def cached_asks(facts: Sequence[KnowledgeFact], path: Path) -> dict[str, list[str]]:
    """fact id -> generated asks, for the facts whose current text is in the cache."""
    cache = read_cache(path)
    out = {}
    for fact in facts:
        entry = cache.get(fact_key(fact))
        if isinstance(entry, dict) and isinstance(entry.get("asks"), list):
            out[fact.id] = [str(q).strip() for q in entry["asks"] if str(q).strip()]
    return out


def parse_asks(text: str) -> list[str]:
    """The questions in a model's answer: a JSON array of strings, else one per line."""
    match = _ARRAY.search(text)
    if match:
        try:
            items = json.loads(match.group(0))
            if isinstance(items, list):
                return [str(q).strip() for q in items if isinstance(q, str) and q.strip()]
        except ValueError:
            pass
    lines = (_LINE_PREFIX.sub("", line).strip().strip('"「」') for line in text.splitlines())
    return [line for line in lines if line and line[-1] in "?？"]


@dataclass
class AsksReport:
    asked: int = 0  # facts sent to the model this time
    cached: int = 0  # facts whose asks were already in the cache
    failed: list[str] = field(default_factory=list)  # one line per fact without asks


async def _generate(provider: Any, todo: Sequence[KnowledgeFact], name: str,
                    concurrency: int) -> dict[str, list[str] | str]:
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(fact: KnowledgeFact) -> tuple[str, list[str] | str]:
        async with gate:
            try:
                done = await provider.complete(PROMPT.format(name=name, n=ASKS_PER_FACT,
                                                             text=fact.text))
            except Exception as exc:  # a provider error is one line; never stop indexing
                return fact.id, f"{fact.id}: {' '.join(str(exc).split())[:200]}"
        asks = parse_asks(done.text)[:ASKS_PER_FACT * 2]
        return fact.id, asks or f"{fact.id}: the answer held no questions"

    try:
        return dict(await asyncio.gather(*(one(f) for f in todo)))
    finally:
        await provider.aclose()


def generate_asks(facts: Sequence[KnowledgeFact], provider: Any, path: Path, *,
                  persona_name: str, concurrency: int = 4) -> AsksReport:
    """Ask `provider` (a pipelines.judge provider) for the questions of every fact not yet
    in the cache at `path`, and write what it answered there."""
    cache = read_cache(path)
    todo = [f for f in facts if fact_key(f) not in cache]
    report = AsksReport(asked=len(todo), cached=len(facts) - len(todo))
    if not todo:
        return report
    answers = asyncio.run(_generate(provider, todo, persona_name, concurrency))
    for fact in todo:
        got = answers.get(fact.id)
        if isinstance(got, list):
            cache[fact_key(fact)] = {"fact_id": fact.id, "text": fact.text,
                                     "model": getattr(provider, "model", None), "asks": got}
        else:
            report.failed.append(got or f"{fact.id}: no answer")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a killed run leaves the old cache whole
    write_atomic(path, json.dumps(cache, ensure_ascii=False, indent=1))
    return report


def explain(facts: Sequence[KnowledgeFact],
            generated: Mapping[str, Sequence[str]]) -> list[str]:
    """Lines for `kyara index --explain`: each fact, then its written and generated asks."""
    lines = []
    for fact in facts:
        lines.append(f"{fact.id}\t{fact.text}")
        lines.extend(f"  asks (knowledge.jsonl): {q}" for q in fact.asks or ())
        lines.extend(f"  asks (generated): {q}" for q in generated.get(fact.id, ()))
        if not fact.asks and not generated.get(fact.id):
            lines.append("  (no asks)")
    return lines
