"""The Judge: scores interactions on criteria, concurrently, with retries, a cache, and
every verdict persisted in the store's `judgments` table.

- Concurrency: an asyncio semaphore of `concurrency` slots, held only while a request is
  in flight (not while backing off), so the bound is on what the provider sees.
- Retries: on 429, 5xx, timeouts, connection errors, malformed or empty answers; the
  wait doubles from `backoff_s` with jitter (0.5-1x, so a burst of 429s does not come back
  in step), or is the server's Retry-After, capped at `retry_after_cap_s`. 400/401/403/404
  are not retried; 401/403/404 (and a local model that will not load) stop the judge: the
  items still waiting fail at once with the same one-line message, without a request.
- Cache: judgments.cache_key (see verdict.cache_key). An `ok` or `invalid` verdict is
  never requested again; a `failed` one is, on the next run. The same words under another
  message id get a copy of the verdict, not a request.
- Persistence: verdicts are upserted in small batches (every `flush_s`) from a worker
  thread, so the event loop never waits on the disk; a row's id is derived from
  (cache_key, message_id), so a retried item replaces its failed row.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import Criterion, JudgeConfig, load_yaml
from pipelines.judge.calibration import CalibrationStatus, calibration_status
from pipelines.judge.parse import parse_score, reasoning_of, weighted_score
from pipelines.judge.prompt import (
    anchor_pool,
    build_prompt,
    check_template,
    format_profile,
    format_speech_rules,
    select_anchors,
)
from pipelines.judge.providers import Completion, Provider, ProviderError, make_provider
from pipelines.judge.verdict import (
    NO_SCORE,
    Interaction,
    JudgeError,
    Verdict,
    cache_key,
    digest_text,
    judge_identity,
)
from pipelines.workspace import PersonaData, Workspace

log = logging.getLogger("kyara.judge")
ZERO_SHOT = " · zero-shot (no anchors of its own)"  # ends a zero-shot criterion's label
_ROW_NAMESPACE = uuid.UUID("6b1f0c8e-5a51-4b0e-9a55-6a7e1d2c3b4a")
_IN_CHUNK = 200  # cache keys per store query


def row_id(cache_key: str, message_id: str) -> str:
    return str(uuid.uuid5(_ROW_NAMESPACE, f"{cache_key}\x1f{message_id}"))


def load_criteria(ws: Workspace, names: Iterable[str]) -> dict[str, Criterion]:
    files = ws.criterion_files()
    out: dict[str, Criterion] = {}
    for name in names:
        if name not in files:
            raise JudgeError(f"unknown criterion {name!r} (known: {', '.join(files) or 'none'})")
        criterion = load_yaml(files[name], Criterion)
        check_template(criterion)
        out[name] = criterion
    return out


class _Writer:
    """Batches judgments rows and upserts them from a worker thread."""

    def __init__(self, store: Any, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._pending: list[dict[str, Any]] = []
        self._drain: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._lock, self._drain = loop, asyncio.Lock(), None

    def put(self, row: dict[str, Any]) -> None:
        self._bind()
        self._pending.append(row)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_task(self._later())

    async def _later(self) -> None:
        await asyncio.sleep(self.interval_s)
        try:
            await self.flush()
        except Exception as exc:  # kept for the next flush() to raise in the caller
            self.error = exc

    async def flush(self) -> None:
        self._bind()
        assert self._lock is not None
        async with self._lock:
            rows, self._pending = self._pending, []
            if rows:
                await asyncio.to_thread(self.store.upsert, "judgments", rows)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


@dataclass
class Ask:
    """One verdict to ask for, as the live path asks it: the verdict fields it will carry
    (`base`: criterion, cache key, message id, ...), the prompt (built anew per attempt:
    fresh delimiters) and the reader that takes the verdict fields from the answer. The
    Batch API path (pipelines.judge.batch_api) sends and reads the same."""

    base: dict[str, Any]
    make_prompt: Callable[[], str]
    read: Callable[[Completion], dict[str, Any] | None]

    @property
    def key(self) -> str:
        return self.base["cache_key"]

    @property
    def message_id(self) -> str:
        return self.base["message_id"] or ""


class Judge:
    """Scores interactions of one persona with one judge config.

        judge = Judge.open(ws, "gpt-4o-mini", persona="ayane")
        verdict = await judge.score(Interaction.from_pair(q, a, id=msg_id), "personality")
        await judge.aclose()
    """

    def __init__(self, config: JudgeConfig, criteria: Mapping[str, Criterion],
                 data: PersonaData, *, store: Any = None, provider: Provider | None = None,
                 home: Path | None = None, backoff_s: float = 0.5, backoff_cap_s: float = 20.0,
                 retry_after_cap_s: float = 60.0, flush_s: float = 0.2,
                 isolated: bool = False) -> None:
        self.config = config
        self.criteria = dict(criteria)
        self.data = data
        self.persona = data.persona
        self.store = store
        self.home = home
        # isolated: a local model in a worker process (the console's live judge)
        self.provider = provider or make_provider(config, home=home, isolated=isolated)
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.retry_after_cap_s = retry_after_cap_s
        self.requests = 0                 # requests sent (attempts), for benches and tests
        self.fatal: ProviderError | None = None
        self._writer = _Writer(store, flush_s) if store is not None else None
        self._semaphore: asyncio.Semaphore | None = None
        self._semaphore_loop: asyncio.AbstractEventLoop | None = None
        # Verdicts of this session, ok/invalid: cache_key -> message_id -> verdict. The
        # store has them too, but the console asks again for a reply it just judged.
        self._memory: dict[str, dict[str, Verdict]] = {}
        # Criteria that want anchors (few_shot > 0) but have no calibration rows of their
        # own: they run zero-shot (no anchors borrowed from another criterion), say so once
        # in the log (`_warned`) and in their calibration label.
        self.zero_shot = {name for name in self.criteria
                          if config.few_shot > 0 and not anchor_pool(data.calibration, name)}
        self._warned: set[str] = set()
        self.identity = judge_identity(config)  # who answers and how: in every key
        self._contexts = {name: self._context_digest(c) for name, c in self.criteria.items()}

    @classmethod
    def open(cls, ws: Workspace, judge: str | None = None, persona: str | None = None, *,
             criteria: Sequence[str] | None = None, store: Any = True, **options: Any) -> Judge:
        """A judge from the configs: `store=True` opens the workspace's store, None keeps
        verdicts in memory only, or pass an open Store."""
        config = ws.judge(judge)
        data = ws.persona_data(persona)
        loaded = load_criteria(ws, criteria or config.criteria)
        if store is True:
            from store import Store

            store = Store.open(ws.settings.store_path())
        return cls(config, loaded, data, store=store or None, home=ws.settings.home_path(),
                   **options)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model(self) -> str:
        return self.config.model

    def calibration(self, criterion: str) -> CalibrationStatus:
        """What the console and the eval report show beside a score: a CalibrationStatus
        ("calibrated" with rho, "stale" after a prompt or model change, or
        "uncalibrated"), its label ending in ZERO_SHOT for a criterion without anchors of
        its own."""
        c = self.criterion(criterion)
        status = calibration_status(self.home or ".", self.name, self.persona.id, c.name,
                                    c.prompt_version, self.model, self.identity)
        if c.name in self.zero_shot:
            status.label += ZERO_SHOT
        return status

    # --- keys and prompts ----------------------------------------------------------------

    def _context_digest(self, criterion: Criterion) -> str:
        # "zero-shot" only where it applies: the other criteria keep their cache keys, and
        # a criterion that gets rows of its own later is judged afresh with them
        mode = ("zero-shot",) if criterion.name in self.zero_shot else ()
        # the anchors' content: an edited calibration row changes the prompts it is shown in
        anchors = [[r.id, r.question, r.reply, r.score, r.reason]
                   for r in anchor_pool(self.data.calibration, criterion.name)]
        return digest_text(criterion.template, format_profile(self.persona),
                           format_speech_rules(self.persona.speech), self.config.few_shot,
                           self.config.seed, self.identity, digest_text(anchors), *mode)

    def criterion(self, name: str) -> Criterion:
        if name not in self.criteria:
            raise JudgeError(f"judge {self.name}: criterion {name!r} is not loaded "
                             f"(loaded: {', '.join(self.criteria)})")
        return self.criteria[name]

    def key(self, interaction: Interaction, criterion: str) -> str:
        c = self.criterion(criterion)
        return cache_key(persona=self.persona.id, interaction=interaction, criterion=c.name,
                         judge_model=self.model, prompt_version=c.prompt_version,
                         context=self._contexts[c.name])

    def prompt(self, interaction: Interaction, criterion: str):
        """The prompt as it would be sent (fresh delimiters each call)."""
        c = self.criterion(criterion)
        if c.name in self.zero_shot and c.name not in self._warned:
            self._warned.add(c.name)
            log.warning("judge %s: criterion %s has no calibration rows of its own for "
                        "persona %s: judged zero-shot (no anchors)", self.name, c.name,
                        self.persona.id)
        anchors = select_anchors(self.data.calibration, c.name, interaction,
                                 self.config.few_shot, self.config.seed)
        return build_prompt(c, self.persona, interaction, anchors)

    # --- the cache -----------------------------------------------------------------------

    async def cached(self, pairs: Sequence[tuple[Interaction, str]]
                     ) -> dict[tuple[str, str], Verdict]:
        """Stored ok/invalid verdicts for (interaction, criterion) pairs, by (item id,
        criterion). A verdict found under another message id is copied to this one."""
        keys = {(i.id or "", c): self.key(i, c) for i, c in pairs}
        found = await self.lookup([(key, mid) for (mid, _), key in keys.items()])
        return {(mid, c): found[(key, mid)] for (mid, c), key in keys.items()
                if (key, mid) in found}

    async def lookup(self, wanted_pairs: Sequence[tuple[str, str]]
                     ) -> dict[tuple[str, str], Verdict]:
        """Stored ok/invalid verdicts by (cache key, message id), from this session's
        memory, else the store. A verdict found under another message id is copied to this
        one (and stored so)."""
        wanted: dict[str, list[str]] = {}
        for key, message_id in wanted_pairs:
            wanted.setdefault(key, []).append(message_id)
        found: dict[str, list[dict[str, Any]]] = {}
        for key in wanted:
            for message_id, verdict in self._memory.get(key, {}).items():
                found.setdefault(key, []).append(verdict.to_row(row_id(key, message_id)))
        missing = [k for k in wanted if k not in found]
        if self.store is not None and missing:
            for row in await asyncio.to_thread(self._stored_rows, missing):
                found.setdefault(row["cache_key"], []).append(row)
        out: dict[tuple[str, str], Verdict] = {}
        for key, rows in found.items():
            for message_id in dict.fromkeys(wanted[key]):
                mine = next((r for r in rows if (r["message_id"] or "") == message_id), None)
                verdict = Verdict.from_row(mine or rows[0])
                if mine is None:  # same words, another message: a copy, not a request
                    verdict.message_id = message_id or None
                    self._persist(verdict)
                out[(key, message_id)] = verdict
        return out

    def _stored_rows(self, keys: list[str]) -> list[dict[str, Any]]:
        from store import quote_list

        rows: list[dict[str, Any]] = []
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start:start + _IN_CHUNK]
            rows += self.store.rows(
                "judgments", where=f"cache_key IN {quote_list(chunk)} AND status != 'failed'")
        return rows

    # --- scoring -------------------------------------------------------------------------

    def _slots(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._semaphore_loop is not loop:
            self._semaphore = asyncio.Semaphore(self.config.concurrency)
            self._semaphore_loop = loop
        return self._semaphore

    async def score(self, interaction: Interaction, criterion: str, *,
                    message_id: str | None = None, use_cache: bool = True) -> Verdict:
        """One criterion's verdict on one interaction. Never raises for a provider failure:
        that is a `failed` verdict (JudgeError only for a criterion that is not loaded)."""
        if message_id is not None and message_id != interaction.id:
            interaction = Interaction(interaction.messages, message_id)
        if use_cache:
            hit = (await self.cached([(interaction, criterion)])).get((interaction.id or "", criterion))
            if hit is not None:
                return hit
        verdict = await self._judge(interaction, criterion)
        self._persist(verdict)
        return verdict

    async def score_items(self, interactions: Sequence[Interaction], criteria: Sequence[str], *,
                          on_verdict: Callable[[Interaction, Verdict], Any] | None = None
                          ) -> dict[tuple[str, str], Verdict]:
        """Every interaction on every criterion; the stored ones come from the cache in one
        query. `on_verdict(interaction, verdict)` is called as each one is known (cached
        ones first). Items need distinct ids. Returns {(item id, criterion): verdict}."""
        pairs = [(i, c) for i in interactions for c in criteria]
        results = await self.cached(pairs)
        for interaction, criterion in pairs:
            hit = results.get((interaction.id or "", criterion))
            if hit is not None and on_verdict is not None:
                on_verdict(interaction, hit)

        async def one(interaction: Interaction, criterion: str) -> None:
            verdict = await self._judge(interaction, criterion)
            self._persist(verdict)
            results[(interaction.id or "", criterion)] = verdict
            if on_verdict is not None:
                on_verdict(interaction, verdict)

        todo = [one(i, c) for i, c in pairs if (i.id or "", c) not in results]
        await asyncio.gather(*todo)
        return results

    async def _judge(self, interaction: Interaction, criterion: str) -> Verdict:
        return await self.ask(self.score_ask(interaction, criterion))

    def score_ask(self, interaction: Interaction, criterion: str) -> Ask:
        """What `score` sends for one criterion's verdict on one interaction."""
        c = self.criterion(criterion)
        base = {"criterion": c.name, "judge_model": self.model, "prompt_version": c.prompt_version,
                "cache_key": self.key(interaction, criterion), "message_id": interaction.id}
        # fresh delimiters per request
        return Ask(base, lambda: self.prompt(interaction, criterion).text, self._verdict)

    async def ask(self, ask: Ask, *, persist: bool = False) -> Verdict:
        """One Ask through the live path (retries, slots), without the cache."""
        verdict = await self._ask(ask.make_prompt, ask.base, ask.read)
        if persist:
            self._persist(verdict)
        return verdict

    def keep(self, verdict: Verdict) -> None:
        """Record a verdict made elsewhere (the Batch API path): memory and store."""
        self._persist(verdict)

    # --- pairwise ------------------------------------------------------------------------

    def pairwise_key(self, conversation: Interaction, a: str, b: str, criterion: str) -> str:
        from pipelines.judge.pairwise import PREFIX, PROMPT_VERSION

        c = self.criterion(criterion)
        shown = Interaction(conversation.messages[:-1] + (("assistant", a), ("assistant", b)))
        return cache_key(persona=self.persona.id, interaction=shown, criterion=PREFIX + c.name,
                         judge_model=self.model, prompt_version=PROMPT_VERSION,
                         context=digest_text(self._contexts[c.name], c.question))

    async def prefer(self, conversation: Interaction, a: str, b: str, criterion: str, *,
                     message_id: str | None = None) -> Verdict:
        """Which of two replies (A, B) to the same conversation better meets `criterion`,
        or a tie: a Verdict of criterion `pairwise:<criterion>` whose score encodes the
        choice (pipelines.judge.pairwise.choice_of reads it). Cached, retried and stored
        like a score; `conversation` ends with a placeholder reply (its text is unused)."""
        ask = self.prefer_ask(conversation, a, b, criterion, message_id=message_id)
        hit = (await self.lookup([(ask.key, ask.message_id)])).get((ask.key, ask.message_id))
        if hit is not None:
            return hit
        verdict = await self.ask(ask)
        self._persist(verdict)
        return verdict

    def prefer_ask(self, conversation: Interaction, a: str, b: str, criterion: str, *,
                   message_id: str | None = None) -> Ask:
        """What `prefer` sends for one order of two replies."""
        from pipelines.judge.pairwise import PREFIX, PROMPT_VERSION, build_pairwise_prompt

        c = self.criterion(criterion)
        base = {"criterion": PREFIX + c.name, "judge_model": self.model,
                "prompt_version": PROMPT_VERSION,
                "cache_key": self.pairwise_key(conversation, a, b, criterion),
                "message_id": message_id or None}
        return Ask(base, lambda: build_pairwise_prompt(c, self.persona, conversation, a, b),
                   self._choice)

    @staticmethod
    def _choice(completion: Completion) -> dict[str, Any] | None:
        from pipelines.judge.pairwise import CHOICE_SCORES, parse_choice

        choice = parse_choice(completion.text)
        if choice is None:
            return None
        return {"score": CHOICE_SCORES[choice], "reasoning": completion.text}

    # --- one request, retried ------------------------------------------------------------

    async def _ask(self, make_prompt: Callable[[], str], base: dict[str, Any],
                   read: Callable[[Completion], dict[str, Any] | None]) -> Verdict:
        """Send the prompt `make_prompt()` builds (anew per attempt) until an answer comes,
        with the retry policy of the module docstring. `read` takes the answer's verdict
        fields (score, reasoning, ...) from it, or None: an answer without one is
        `invalid`, its raw text kept."""
        started = time.perf_counter()
        attempts = 0
        while True:
            if self.fatal is not None:
                return Verdict(status="failed", error_kind=self.fatal.kind, error=str(self.fatal),
                               attempts=attempts, latency_ms=_ms(started), **base)
            prompt = make_prompt()
            try:
                async with self._slots():
                    if self.fatal is not None:  # it stopped while this one waited for a slot
                        continue
                    attempts += 1
                    self.requests += 1
                    completion = await self.provider.complete(prompt)
            except ProviderError as exc:
                if exc.fatal:
                    self.fatal = self.fatal or exc
                last = attempts > self.config.max_retries
                if not exc.retryable or last:
                    log.info("%s", exc)
                    return Verdict(status="failed", error_kind=exc.kind, error=str(exc),
                                   attempts=attempts, latency_ms=_ms(started), **base)
                delay = self._delay(attempts, exc.retry_after)
                log.info("%s; attempt %d, again in %.2f s", exc, attempts, delay)
                await asyncio.sleep(delay)
                continue
            return self.answered(completion, base, read, attempts=attempts,
                                 latency_ms=_ms(started))

    @staticmethod
    def answered(completion: Completion, base: dict[str, Any],
                 read: Callable[[Completion], dict[str, Any] | None], *, attempts: int,
                 latency_ms: float | None) -> Verdict:
        """The verdict an answer makes: `ok` with what `read` found, else `invalid` with
        the raw text kept (the live and the batch path alike)."""
        common = {"raw_text": completion.text, "tokens": completion.tokens,
                  "attempts": attempts, "latency_ms": latency_ms, **base}
        fields = read(completion)
        if fields is None:
            return Verdict(status="invalid", error_kind=NO_SCORE, **common)
        return Verdict(status="ok", **fields, **common)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap_s)
        ceiling = min(self.backoff_cap_s, self.backoff_s * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)

    @staticmethod
    def _verdict(completion: Completion) -> dict[str, Any] | None:
        text = completion.text
        parsed = parse_score(text)
        if parsed is None:
            return None
        return {"score": parsed.score,
                "weighted_score": weighted_score(text, parsed, completion.logprobs),
                "reasoning": reasoning_of(text, parsed)}

    def _persist(self, verdict: Verdict) -> None:
        message_id = verdict.message_id or ""
        if verdict.cache_key is None:
            return
        if verdict.status == "failed" and verdict.attempts == 0:
            return  # nothing was asked (the judge had stopped): nothing to record
        if verdict.status != "failed":
            self._memory.setdefault(verdict.cache_key, {})[message_id] = verdict
        if self._writer is not None:
            self._writer.put(verdict.to_row(row_id(verdict.cache_key, message_id)))

    async def flush(self) -> None:
        """Write the verdicts still waiting for the store; raises a StoreError if one failed."""
        if self._writer is not None:
            await self._writer.flush()

    async def aclose(self) -> None:
        try:
            await self.flush()
        finally:
            await self.provider.aclose()


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
