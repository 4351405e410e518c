"""Large judge runs through the OpenAI Batch API: half the price, answers within 24 hours.

`judge_batch(judge, asks, state_path, ...)` is a generator of job events that returns one
Verdict per Ask (pipelines.judge.runner.Ask: what the live path would send):

1. Asks already in the judgments cache are not sent.
2. The rest become one JSON Lines file of chat-completions requests whose bodies are built
   by the live path's own code (the Ask's prompt, `OpenAIProvider.request_body`: same
   model, messages, temperature, seed, token budget, logprobs). custom_id is the cache key,
   so the same words asked under two message ids are one request.
3. The file is uploaded (purpose "batch") and a batch created on /v1/chat/completions with a
   24 h window. `state_path` (batch.json beside the job's output, written atomically after
   each step) holds the input file id, then the batch id: a job restarted re-attaches to
   its batch instead of submitting another (and never uploads the file twice).
4. The batch is polled every `poll_s` until it ends (completed, expired, cancelled, failed)
   or `timeout_s` has passed; each poll is a progress event with its request counts.
   Stopping the job (cancel, timeout, a kill) leaves the batch running at the provider: a
   rerun re-attaches and collects it.
5. The output file's answers are read by the live path's readers (`Judge.answered`) and
   kept in the same judgments cache, so a later live run asks none of them again. Rows in
   the error file, answers that are not a chat completion, and the requests an expired or
   cancelled batch never ran are asked through the live path, retries included.

Only an OpenAI or OpenAI-compatible judge has a Batch API; a server without /batches
answers 404 on the upload, and the job says so in one line.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines.config import ConfigError, JudgeConfig, JudgePrices
from pipelines.events import Event
from pipelines.files import jsonl_lines, jsonl_text, read_jsonl_lines, write_atomic
from pipelines.judge.providers import OpenAIProvider, ProviderError
from pipelines.judge.runner import Ask, Judge
from pipelines.judge.verdict import Verdict

ENDPOINT = "/v1/chat/completions"
WINDOW = "24h"
ENDED = frozenset({"completed", "expired", "cancelled", "failed"})
STATE_VERSION = 1
POLL_FAILURES = 5          # transient errors in a row while polling before giving up
CUSTOM_ID_CHARS = 48       # of the 64-hex cache key: unique enough, short enough


class BatchError(ConfigError):
    """The Batch API refused or garbled something: one line, and the user's to act on
    (wait, raise a limit, or set batch: false), so the job runner reports it as it reports
    a ConfigError. Nothing computed is lost: verdicts are in the store, ids in batch.json."""


def batch_prices(config: JudgeConfig) -> tuple[JudgePrices | None, str]:
    """What a token costs through the Batch API, and where that figure comes from."""
    if config.batch_prices is not None:
        return config.batch_prices, "batch_prices from the judge config"
    if config.prices is not None:
        half = JudgePrices(input=config.prices.input / 2, output=config.prices.output / 2)
        return half, "half the live prices"
    return None, "no prices"


def custom_id(ask: Ask) -> str:
    return ask.key[:CUSTOM_ID_CHARS]


def judge_batch(judge: Judge, asks: Sequence[Ask], state_path: Path, *,
                loop: asyncio.AbstractEventLoop, poll_s: float, timeout_s: float,
                stage: str, check_cancelled: Callable[[], None] = lambda: None,
                sleep: Callable[[float], None] = time.sleep,
                ) -> Generator[Event, None, list[Verdict]]:
    """One verdict per Ask, in order: from the cache, from a batch, or live for what the
    batch did not answer. See the module docstring."""
    provider = judge.provider
    if not isinstance(provider, OpenAIProvider):
        raise BatchError(f"judge {judge.name}: batch: true needs an OpenAI or "
                         f"OpenAI-compatible judge (this one is {judge.config.provider})")
    state_path = Path(state_path)
    hits = loop.run_until_complete(judge.lookup([(a.key, a.message_id) for a in asks]))
    todo: dict[str, list[Ask]] = {}
    seen: set[tuple[str, str]] = set(hits)
    for ask in asks:
        if (ask.key, ask.message_id) not in seen:
            seen.add((ask.key, ask.message_id))
            todo.setdefault(custom_id(ask), []).append(ask)
    if hits:
        yield ev.log(f"{len(hits)} verdict(s) already in the judgments cache: not sent")
    results: dict[tuple[str, str], Verdict] = dict(hits)
    if todo:
        session = _Session(judge, provider, state_path, stage)
        answered = yield from session.run(todo, loop=loop, poll_s=poll_s, timeout_s=timeout_s,
                                          check_cancelled=check_cancelled, sleep=sleep)
        results.update(answered)
    return [results[(a.key, a.message_id)] for a in asks]


class _Session:
    """One batch's life: submit or re-attach, poll, collect, ask the rest live."""

    def __init__(self, judge: Judge, provider: OpenAIProvider, state_path: Path,
                 stage: str) -> None:
        self.judge = judge
        self.provider = provider
        self.state_path = state_path
        self.input_path = state_path.with_name(state_path.stem + ".input.jsonl")
        self.stage = stage
        self.where = provider.where
        self.client = provider.batch_client()

    # --- the state file ------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise BatchError(f"{self.state_path}: not a batch state file (delete it to "
                             "submit a new batch)") from None
        return state if isinstance(state, dict) else None

    def _write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.state_path, json.dumps(state, ensure_ascii=False, indent=2) + "\n")

    def _sent_ids(self) -> set[str]:
        """The custom_ids of the input file this state was made from."""
        out: set[str] = set()
        try:
            lines = read_jsonl_lines(self.input_path)
        except OSError:
            return out
        for line in lines:
            try:
                out.add(json.loads(line)["custom_id"])
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def _reusable(self, state: dict[str, Any] | None, todo: dict[str, list[Ask]]) -> bool:
        if not state or state.get("collected") or state.get("version") != STATE_VERSION:
            return False
        if state.get("model") != self.judge.model or state.get("base_url") != self.judge.config.base_url:
            return False
        return bool(self._sent_ids() & set(todo))

    # --- one call to the API, one line when it fails ---------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        openai = self.provider._openai
        name = self.judge.name
        try:
            return fn()
        except openai.APIStatusError as exc:
            status = exc.status_code
            from pipelines.judge.providers import _server_message

            detail = "" if status == 401 else self.provider._scrub(_server_message(exc))
            hint = {401: f" — check {self.judge.config.api_key_env or 'the key variable'}",
                    404: " — does this server have the Batch API (/files, /batches)?",
                    429: " — the provider's batch queue limit; run the job again later, or "
                         "set batch: false"}.get(status, "")
            raise BatchError(f"judge {name}: {self.where} refused to {what} (HTTP {status}"
                             + (f": {detail}" if detail else "") + f"){hint}") from None
        except openai.APITimeoutError:
            raise BatchError(f"judge {name}: no answer from {self.where} within "
                             f"{self.judge.config.timeout_s:g} s when asked to {what}") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise BatchError(self.provider._scrub(f"judge {name}: cannot reach {self.where} "
                                                  f"to {what}: {detail}")) from None
        except (openai.OpenAIError, ValueError, TypeError, AttributeError) as exc:
            # a body that is not what the API documents (HTML, not JSON, the wrong shape)
            raise BatchError(self.provider._scrub(
                f"judge {name}: {self.where} sent a malformed answer when asked to {what} "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})")) from None

    def _field(self, obj: Any, name: str, what: str) -> str:
        value = getattr(obj, name, None)
        if not isinstance(value, str) or not value:
            raise BatchError(f"judge {self.judge.name}: {self.where} sent a malformed answer "
                             f"when asked to {what} (no {name})")
        return value

    # --- the whole life ------------------------------------------------------------------

    def run(self, todo: dict[str, list[Ask]], *, loop: asyncio.AbstractEventLoop,
            poll_s: float, timeout_s: float, check_cancelled: Callable[[], None],
            sleep: Callable[[float], None]
            ) -> Generator[Event, None, dict[tuple[str, str], Verdict]]:
        try:
            state = self._read_state()
            if self._reusable(state, todo):
                assert state is not None
                sent = self._sent_ids()
                target = state.get("batch_id") or f"uploaded file {state.get('input_file_id')}"
                yield ev.log(f"batch: re-attaching to {target} ({self.state_path.name})")
            else:
                if state and not state.get("collected"):
                    yield ev.log(f"batch: {self.state_path.name} is for other requests or "
                                 "another judge; submitting a new batch", level="warning")
                state, sent = self._upload(todo), set(todo)
            if not state.get("batch_id"):
                state = self._create(state)
            yield ev.log(f"batch {state['batch_id']}: {len(sent)} requests at {self.where}; "
                         f"if this job stops, a rerun re-attaches ({self.state_path})")
            batch = yield from self._wait(state, poll_s, timeout_s, check_cancelled, sleep)
            answered, failures = self._collect(batch, todo)
        finally:
            self.client.close()
        async def keep() -> None:  # in the store before batch.json says collected
            for verdict in answered.values():
                self.judge.keep(verdict)
            await self.judge.flush()
        loop.run_until_complete(keep())
        self._write_state({**state, "status": batch.status, "collected": True,
                           "answered": len(answered)})
        missing = [a for asks in todo.values() for a in asks
                   if (a.key, a.message_id) not in answered]
        status = batch.status
        yield ev.log(f"batch {state['batch_id']} {status}: {len(answered)} verdict(s) from the "
                     f"batch" + (f"; {len(missing)} asked live" if missing else "")
                     + (f" ({failures[0]})" if failures else ""),
                     level="warning" if missing else "info")
        if missing:
            async def live() -> list[Verdict]:
                try:
                    return list(await asyncio.gather(
                        *(self.judge.ask(a, persist=True) for a in missing)))
                finally:
                    await self.judge.flush()
            for ask, verdict in zip(missing, loop.run_until_complete(live()), strict=True):
                answered[(ask.key, ask.message_id)] = verdict
        return answered

    def _upload(self, todo: dict[str, list[Ask]]) -> dict[str, Any]:
        rows = [{"custom_id": cid, "method": "POST", "url": ENDPOINT,
                 "body": self.provider.request_body(asks[0].make_prompt())}
                for cid, asks in todo.items()]
        text = jsonl_text(rows)
        write_atomic(self.input_path, text)
        uploaded = self._call("upload the batch file", lambda: self.client.files.create(
            file=(self.input_path.name, text.encode("utf-8"), "application/jsonl"),
            purpose="batch"))
        state = {"version": STATE_VERSION, "stage": self.stage, "judge": self.judge.name,
                 "model": self.judge.model, "base_url": self.judge.config.base_url,
                 "requests": len(rows), "input": self.input_path.name,
                 "input_file_id": self._field(uploaded, "id", "upload the batch file"),
                 "batch_id": None, "collected": False}
        self._write_state(state)
        return state

    def _create(self, state: dict[str, Any]) -> dict[str, Any]:
        what = "create the batch"
        batch = self._call(what, lambda: self.client.batches.create(
            input_file_id=state["input_file_id"], endpoint=ENDPOINT, completion_window=WINDOW,
            metadata={"kyara": f"{self.judge.name} {self.stage}"}))
        state = {**state, "batch_id": self._field(batch, "id", what),
                 "status": getattr(batch, "status", None)}
        self._write_state(state)
        return state

    def _wait(self, state: dict[str, Any], poll_s: float, timeout_s: float,
              check_cancelled: Callable[[], None], sleep: Callable[[float], None]
              ) -> Generator[Event, None, Any]:
        batch_id = state["batch_id"]
        started = time.monotonic()
        failures = 0
        last = None
        while True:
            check_cancelled()
            try:
                batch = self._call("report on the batch",
                                   lambda: self.client.batches.retrieve(batch_id))
                status = self._field(batch, "status", "report on the batch")
                failures = 0
            except BatchError as exc:
                failures += 1
                if failures >= POLL_FAILURES:
                    raise BatchError(f"{exc} ({failures} times in a row; batch {batch_id} "
                                     f"keeps running: run the job again to re-attach)") from None
                yield ev.log(f"{exc}; asking again in {poll_s:g} s", level="warning")
                status, batch = None, None
            if batch is not None:
                counts = getattr(batch, "request_counts", None)
                done = (getattr(counts, "completed", 0) or 0) + (getattr(counts, "failed", 0) or 0)
                total = getattr(counts, "total", None) or state.get("requests")
                yield ev.progress(done, total, "requests", stage=self.stage)
                if status != last:
                    yield ev.log(f"batch {batch_id}: {status} ({done} of {total} done, "
                                 f"{getattr(counts, 'failed', 0) or 0} failed)")
                    last = status
                if status in ENDED:
                    if status == "failed":  # the input file was refused: nothing ran
                        self._write_state({**state, "status": status, "collected": True})
                        raise BatchError(f"judge {self.judge.name}: batch {batch_id} failed: "
                                         f"{_batch_errors(batch)}")
                    return batch
            if time.monotonic() - started >= timeout_s:
                raise BatchError(f"judge {self.judge.name}: batch {batch_id} still "
                                 f"{last or 'unknown'} after {timeout_s:g} s (batch_timeout_s); "
                                 f"it keeps running at {self.where}: run the job again to "
                                 f"re-attach ({self.state_path.name})")
            deadline = time.monotonic() + poll_s
            while (left := deadline - time.monotonic()) > 0:  # cancel within a second
                check_cancelled()
                sleep(min(1.0, left))

    def _download(self, file_id: str | None, what: str) -> list[str]:
        if not file_id:
            return []
        content = self._call(what, lambda: self.client.files.content(file_id))
        raw = getattr(content, "content", content)
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        if not isinstance(raw, bytes):
            raise BatchError(f"judge {self.judge.name}: {self.where} sent a malformed "
                             f"answer when asked to {what}")
        return [line for line in jsonl_lines(raw.decode("utf-8", "replace")) if line.strip()]

    def _collect(self, batch: Any, todo: dict[str, list[Ask]]
                 ) -> tuple[dict[tuple[str, str], Verdict], list[str]]:
        """The verdicts the output file holds, by (cache key, message id), and one line per
        kind of failure seen (error file rows, bad rows) for the log."""
        answered: dict[tuple[str, str], Verdict] = {}
        failures: list[str] = []
        lines = self._download(getattr(batch, "output_file_id", None), "download the output")
        errors = self._download(getattr(batch, "error_file_id", None), "download the errors")
        garbled = 0
        for line in lines:
            row = _row(line)
            asks = todo.get(row.get("custom_id")) if row is not None else None
            if row is None:
                garbled += 1
                continue
            if not asks:
                continue  # a request this run does not need (an earlier run's, or ours twice)
            response = row.get("response") if isinstance(row.get("response"), dict) else {}
            if row.get("error") or response.get("status_code") != 200:
                failures.append(_row_error(row))
                continue
            try:
                completion = self.provider.completion_of(response.get("body"))
            except ProviderError as exc:
                failures.append(str(exc))
                continue
            for ask in asks:
                answered[(ask.key, ask.message_id)] = Judge.answered(
                    completion, ask.base, ask.read, attempts=1, latency_ms=None)
        for line in errors:
            row = _row(line)
            if row is None:
                garbled += 1
            elif row.get("custom_id") in todo:
                failures.append(_row_error(row))
        if garbled:
            failures.append(f"{garbled} line(s) of the batch files were not JSON")
        return answered, failures


def _row(line: str) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("custom_id"), str) else None


def _row_error(row: dict[str, Any]) -> str:
    """One line for a failed row: its error, or the status and message of its response."""
    error = row.get("error")
    if isinstance(error, dict) and error.get("message"):
        return ev.one_line(f"{error.get('code') or 'error'}: {error['message']}", 160)
    response = row.get("response") if isinstance(row.get("response"), dict) else {}
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    inner = body.get("error", body)
    message = inner.get("message") if isinstance(inner, dict) else None
    return ev.one_line(f"HTTP {response.get('status_code')}" + (f": {message}" if message else ""),
                       160)


def _batch_errors(batch: Any) -> str:
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) or []
    messages = [getattr(e, "message", None) for e in data]
    text = "; ".join(m for m in messages if m) or "no reason given"
    return ev.one_line(text, 300)
