"""A chat session: retrieve (when on), build the persona prompt, stream the reply, and log
every turn to the store. The console and `kyara ask` share it.

Never lose a turn: the user's message is written before generation starts; the reply is
written when it ends — `complete`, or `incomplete` when the consumer stopped reading
(cancel, Ctrl+C), or `error` with the one-line reason. Everything that produced a reply
(variant, adapter, retrieval, rendered prompt, options, speed) is kept with it.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import turn
from pipelines.config import Persona, Variant
from pipelines.inference.base import BackendError, ChatBackend, Delta, GenerationOptions
from pipelines.pool import BackendPool
from store import Store, new_id
from store.sql import quote
from store.store import utcnow


@dataclass
class Retrieved:
    """First event of a turn with retrieval on: the facts that went into the prompt."""

    hits: list[Any]


@dataclass
class TurnDone:
    """Last event of a turn: the stored assistant row (status complete / error)."""

    message: dict[str, Any]


@dataclass
class ChatSession:
    store: Store
    persona: Persona
    variant: Variant
    # The variant's loaded backend, or None: then the pool loads it inside send(), after
    # the user's message is stored, so a missing model costs no typed text. A backend given
    # here joins the pool (under this variant's name).
    backend: ChatBackend | None = None
    retriever: Any = None  # pipelines.retrieval.Retriever; None = retrieval unavailable
    rag: bool = False
    session_id: str = field(default_factory=new_id)
    history_turns: int = turn.HISTORY_TURNS  # user/assistant pairs sent with each prompt
    kind: str = "chat"
    title: str | None = None
    _seq: int = 0
    _started: bool = False
    _rows: list[dict[str, Any]] | None = None  # this session's messages, as written
    # what goes into every reply row's options_json besides the options (a blind
    # comparison records its seed and sides there)
    tags: dict[str, Any] | None = None
    # replies that are not the chosen one of their group (alternatives, edited originals);
    # None: read from the store when next needed
    _hidden: set[str] | None = None
    _alternative_of: dict[str, Any] | None = None  # the reply being regenerated, if any
    _feedback_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # where backends come from, shared with the console's other screens; by default a pool
    # with no loader: only the backend given
    pool: BackendPool = field(default_factory=BackendPool, repr=False)

    def __post_init__(self) -> None:
        if self.backend is not None:
            self.pool.adopt(self.variant.name, self.backend)
        if not self._started:
            self._rows = []  # a new session: nothing to read back
            self._hidden = set()  # and no alternatives

    # --- sessions ----------------------------------------------------------------------

    @classmethod
    def resume(cls, store: Store, session_id: str, **kwargs: Any) -> ChatSession:
        row = store.get("sessions", session_id)
        if row is None:
            raise BackendError(f"no session {session_id} in the store at {store.path}")
        session = cls(store=store, session_id=session_id, **kwargs)
        session._started = True
        session.reload()  # the history (and which replies were chosen) from the store
        return session

    def _ensure_session(self, first_text: str) -> None:
        if self._started:
            return
        now = utcnow()
        self.store.upsert("sessions", [{
            "id": self.session_id, "persona": self.persona.id, "variant": self.variant.name,
            "kind": self.kind, "title": self.title or first_text[:40],
            "created_at": now, "updated_at": now,
        }])
        self._started = True

    def messages(self) -> list[dict[str, Any]]:
        """The session's messages in order. Read from the store once (resume); after that
        kept in memory as they are written, so a turn does not re-read its history."""
        if self._rows is None:
            rows = self.store.rows("messages", where=f"session_id = {quote(self.session_id)}")
            # an alternative or an edit shares its original's seq: oldest first
            self._rows = sorted(rows, key=lambda r: (r["seq"], r["created_at"]))
        return list(self._rows)

    def hidden_replies(self) -> set[str]:
        """Replies that are not the chosen one of their group: neither sent to the model
        nor shown in the transcript."""
        with self._feedback_lock:
            if self._hidden is None:
                from pipelines.feedback import visible_reply_ids

                visible = visible_reply_ids(self.store, self.session_id)
                self._hidden = {r["id"] for r in self.messages()
                                if r["role"] == "assistant" and r["id"] not in visible}
            return set(self._hidden)

    def visible_messages(self) -> list[dict[str, Any]]:
        """The conversation as it continues: each user turn and its chosen reply."""
        hidden = self.hidden_replies() if self.kind != "compare" else set()
        return [r for r in self.messages() if r["id"] not in hidden]

    def _feedback_changed(self, row: dict[str, Any] | None = None) -> None:
        with self._feedback_lock:
            if row is not None and self._rows is not None and all(
                    r["id"] != row["id"] for r in self._rows):
                self._rows.append(row)
                self._rows.sort(key=lambda r: (r["seq"], r["created_at"]))
            self._hidden = None

    def alternatives(self, message_id: str) -> list[dict[str, Any]]:
        """The reply's group (the original, its regenerations and edits), position order;
        a reply never regenerated is a group of one."""
        from pipelines.feedback import alternatives

        rows = alternatives(self.store, message_id)
        if rows:
            return rows
        own = next((r for r in self.messages() if r["id"] == message_id), None)
        return [own] if own is not None else []

    def choose(self, message_id: str) -> None:
        """This alternative continues the conversation (raises FeedbackError when gone)."""
        from pipelines.feedback import choose_alternative

        choose_alternative(self.store, message_id)
        self._feedback_changed()

    def edit(self, message_id: str, text: str) -> dict[str, Any]:
        """Store an edit of a reply (the original is kept); the edited text continues the
        conversation. Returns the new message row."""
        from pipelines.feedback import record_edit

        row = record_edit(self.store, message_id, text)
        self._feedback_changed(row)
        return row

    def sampling_options(self) -> GenerationOptions:
        """Options for a regenerated reply: sampling at the variant's temperature (the
        default one when the variant is greedy), a new seed each time."""
        gen = self.variant.generation
        temperature = gen.temperature or type(gen)().temperature
        return GenerationOptions.from_config(gen, temperature=temperature,
                                             seed=random.randrange(2**31))

    def _touch_session(self) -> None:
        """updated_at moves after each reply (off the path to the first token)."""
        row = self.store.get("sessions", self.session_id)
        if row is not None:
            self.store.upsert("sessions", [row])  # the store sets updated_at on write

    def history(self, before_seq: int | None = None) -> list[dict[str, str]]:
        """Past exchanges to send with the next prompt, by the one history rule
        (`turn.history`: user turns with the reply the user saw, the chosen one, the last
        `history_turns`); none in a compare session. `before_seq`: the turns before that
        one (a regenerated reply sees what the original saw; the judge sees what the model
        was sent with a reply)."""
        if self.kind == "compare":
            return []  # each compared question stands alone
        pairs: list[tuple[str, str]] = []
        pending: dict | None = None
        for row in self.visible_messages():
            if before_seq is not None and row["seq"] >= before_seq:
                break
            if row["role"] == "user":
                pending = row
            elif row["role"] == "assistant" and pending is not None:
                if turn.seen(row):
                    pairs.append((pending["content"], row["content"]))
                pending = None
        return turn.history(pairs, self.history_turns)

    # --- one turn ----------------------------------------------------------------------

    def use(self, variant: Variant) -> None:
        """Answer with `variant` from the next turn: its backend comes from the pool (loaded
        there on first use; the others stay loaded)."""
        self.variant = variant
        self.backend = self.pool.loaded(variant.name)

    def share(self, pool: BackendPool) -> None:
        """Take backends from `pool` from now on; the backend loaded here joins it."""
        if self.backend is not None:
            pool.adopt(self.variant.name, self.backend)
        self.pool = pool

    def loaded_backend(self) -> ChatBackend:
        if self.backend is None:
            # may raise BackendError: the caller records it
            self.backend = self.pool.get(self.variant)
        return self.backend

    def _write(self, row: dict[str, Any]) -> dict[str, Any]:
        original = self._alternative_of if row["role"] == "assistant" else None
        full = {"id": new_id(), "session_id": self.session_id,
                "seq": original["seq"] if original else self._seq,
                "created_at": utcnow(), "rag": self.rag, "variant": self.variant.name,
                "adapter": getattr(self.variant, "adapter", None) or getattr(
                    self.variant, "lora_path", None), **row}
        self.store.upsert("messages", [full])
        if self._rows is not None:
            self._rows.append(full)
            if original is not None:  # next to its original, not at the end
                self._rows.sort(key=lambda r: (r["seq"], r["created_at"]))
        if original is None:
            self._seq += 1
        elif full["status"] != "error" and full["content"]:
            # a regenerated reply the user saw joins its original's group as the chosen one;
            # a failed or empty one stays out of the conversation
            from pipelines.feedback import add_alternative

            add_alternative(self.store, original["id"], full["id"])
            self._feedback_changed()
        if full["role"] == "assistant":
            self._touch_session()
        return full

    def send(self, text: str, options: GenerationOptions | None = None, *,
             new_question: bool = True) -> Iterator[Any]:
        """Yields Retrieved (when retrieval is on), Deltas, then TurnDone. Stopping the
        iteration early stores the reply so far as `incomplete`.

        new_question=False answers the question already stored last again (a comparison:
        one question, one reply per variant/retrieval combination)."""
        options = options or GenerationOptions.from_config(self.variant.generation)
        with self._turn():
            history = self.history()  # read before this turn is written

            def store_question() -> None:
                self._ensure_session(text)
                if new_question:
                    self._write({"role": "user", "content": text, "status": "complete"})

            yield from self._answer(text, history, options, store_question)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """One turn at a time on a session, across processes: two consoles resuming one
        session take turns (an exclusive flock beside the store, held for the whole turn),
        and a turn that follows another process's reads the session again first, so its
        history and numbering include that turn."""
        if not self._started or self.kind == "compare":
            yield  # a new session: no other process knows it yet
            return
        folder = Path(f"{self.store.path}.session-locks")
        folder.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(folder / f"{self.session_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        me = f"{os.getpid()}-{id(self)}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another console's turn streams
            last = os.pread(fd, 128, 0).decode("ascii", "replace").strip()
            if last and last != me:
                self.reload()
            yield
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode("ascii"), 0)
        finally:
            os.close(fd)  # the lock goes with it

    def reload(self) -> None:
        """Read this session's messages (and its chosen replies) from the store again."""
        with self._feedback_lock:
            self._rows, self._hidden = None, None
        self._seq = max((m["seq"] for m in self.messages()), default=-1) + 1

    def regenerate(self, message_id: str, options: GenerationOptions | None = None
                   ) -> Iterator[Any]:
        """Answer the question of reply `message_id` again (sampling on, a new seed, the
        history that reply saw): the same events as send(). The new reply is stored with
        the original's seq and becomes the chosen alternative of its group."""
        rows = self.messages()
        original = next((r for r in rows if r["id"] == message_id
                         and r["role"] == "assistant"), None)
        question = None if original is None else next(
            (r for r in reversed(rows) if r["role"] == "user" and r["seq"] < original["seq"]),
            None)
        if original is None or question is None:
            raise BackendError("that reply is no longer in this session")
        history = self.history(before_seq=question["seq"])
        self._alternative_of = original
        try:
            with self._turn():
                yield from self._answer(question["content"], history,
                                        options or self.sampling_options(), lambda: None)
        finally:
            self._alternative_of = None

    def _answer(self, text: str, history: list[dict[str, str]], options: GenerationOptions,
                store_question: Callable[[], None]) -> Iterator[Any]:
        hits: list[Any] | None = None
        retrieval_ms: float | None = None
        if self.rag and self.retriever is not None:
            # The question is stored while the facts are retrieved: lance's write and the
            # query embedding run on different cores (~9 and ~10 ms, both before the first
            # token). Nothing is generated before the question is stored.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kyara-store") as pool:
                stored = pool.submit(store_question)
                hits, retrieval_ms = turn.retrieve(self.retriever, text)
                stored.result()
            yield Retrieved(hits=hits)
        else:
            store_question()
            if self.rag:
                yield from self._fail("retrieval is on but the persona is not indexed "
                                      f"(run: kyara index {self.persona.id})", options, None, None)
                return

        prompt = turn.build(self.persona, history, text, hits, retrieval_ms)
        try:
            backend = self.loaded_backend()
        except BackendError as exc:
            yield from self._fail(str(exc), options, hits, None)
            return

        shown: list[str] = []
        try:
            reply = yield from turn.stream(backend, prompt.messages, options, shown)
        except (GeneratorExit, KeyboardInterrupt):
            # The consumer stopped reading (cancel, Ctrl+C): keep what was shown. The
            # backend's stream is closed already (generation stops within one token).
            self._write(self._reply_row("".join(shown), "incomplete", options, hits,
                                        turn.render(backend, prompt.messages), None, "cancel",
                                        retrieval_ms))
            raise
        final = reply.final
        if reply.error is not None:
            if final is not None:
                yield final
            yield from self._fail(reply.error, options, hits, reply.rendered, reply.text)
            return
        row = self._write(self._reply_row(reply.text, "complete", options, hits, reply.rendered,
                                          final, final.stop_reason if final else "eos",
                                          retrieval_ms))
        if final is not None:
            yield final
        yield TurnDone(message=row)

    def _reply_row(self, content: str, status: str, options: GenerationOptions,
                   hits: Sequence[Any] | None, rendered: str | None, final: Delta | None,
                   stop_reason: str | None, retrieval_ms: float | None,
                   error: str | None = None) -> dict[str, Any]:
        extra = {"options": options.as_dict(), "backend": self.variant.backend,
                 **(self.tags or {})}
        if retrieval_ms is not None:
            extra["retrieval_ms"] = round(retrieval_ms, 3)
        if final is not None and final.stop_token:
            extra["stop_token"] = final.stop_token
        return {
            "role": "assistant", "content": content, "status": status,
            "rendered_prompt": rendered,
            "retrieved_ids": [h.fact_id for h in hits] if hits is not None else None,
            "options_json": json.dumps(extra, ensure_ascii=False),
            "prompt_tokens": final.prompt_tokens if final else None,
            "completion_tokens": final.completion_tokens if final else None,
            "ttft_ms": final.ttft_s * 1000 if final and final.ttft_s is not None else None,
            "tokens_per_s": final.tokens_per_s if final else None,
            "stop_reason": stop_reason, "error": error,
        }

    def _fail(self, message: str, options: GenerationOptions, hits: Sequence[Any] | None,
              rendered: str | None, partial: str = "") -> Iterator[Any]:
        row = self._reply_row(partial, "error", options, hits, rendered, None, "error", None,
                              error=message)
        yield TurnDone(message=self._write(row))


def open_session(workspace: Any, *, persona: str | None = None, variant: str | None = None,
                 rag: bool | None = None, resume: str | None = None,
                 store: Store | None = None, backend: ChatBackend | None = None,
                 pool: BackendPool | None = None) -> ChatSession:
    """Everything a chat needs, from the user's configuration: persona, variant, backend,
    store, and a retriever when the persona has been indexed. Backends come from `pool`,
    else from a pool of this session's that loads each in a worker process (the caller
    closes it: `session.pool.close()`)."""
    from pipelines.inference.worker import spawn_backend
    from pipelines.retrieval.opening import find_retriever  # numpy and the store's index

    settings = workspace.settings
    p = workspace.persona(persona)
    v = workspace.variant(variant)
    store = store or Store.open(settings.store_path())
    rag = settings.rag if rag is None else rag
    retriever = find_retriever(store, p.id, settings.home_path())
    if rag and retriever is None:
        raise BackendError(f"retrieval is on but persona '{p.id}' is not indexed "
                           f"(run: kyara index {p.id})")
    home = settings.home_path()
    kwargs = dict(persona=p, variant=v, retriever=retriever, rag=rag, backend=backend,
                  pool=pool or BackendPool(lambda variant: spawn_backend(variant, home)))
    if resume:
        return ChatSession.resume(store, resume, **kwargs)
    return ChatSession(store=store, **kwargs)


@dataclass
class Combo:
    """One column of a comparison: a variant and whether retrieval is on."""

    variant: Variant
    rag: bool

    @property
    def label(self) -> str:
        return f"{self.variant.name} · RAG {'on' if self.rag else 'off'}"


def default_combos(variants: dict[str, Variant], current: Variant, rag_available: bool,
                   wanted: list[str] | None = None, *, home: Path | None = None
                   ) -> list[Combo]:
    """The comparison to run: the configured one (`name` or `name+rag` items), else the 2×2
    of the current variant and the first fine-tuned one (a LoRA adapter or GGUF LoRA) that
    this machine can load (see `unloadable`) × retrieval off / on — fewer when there is no
    such variant or no index. `home` is the kyara home relative paths are taken from."""
    if wanted:
        combos = []
        for item in wanted:
            name, _, flag = item.partition("+")
            if name not in variants:
                raise BackendError(f"compare: unknown variant '{name}' "
                                   f"(known: {', '.join(variants)})")
            combos.append(Combo(variants[name], flag == "rag"))
        return combos[:4]
    tuned = next((v for v in variants.values() if v.name != current.name and (
        getattr(v, "adapter", None) or getattr(v, "lora_path", None))
        and unloadable(v, home) is None), None)
    models = [current] + ([tuned] if tuned is not None else [])
    rags = [False, True] if rag_available else [False]
    return [Combo(v, r) for v in models for r in rags]


def unloadable(variant: Variant, home: Path | None = None) -> str | None:
    """Why this machine cannot load `variant` (one line), or None when it looks loadable.

    A cheap look, nothing is loaded or imported beyond huggingface_hub (the kind's
    `unloadable`, `inference.kinds`): the model file or folder, the adapter or LoRA file,
    the local Hugging Face cache for a hub id (a model that would first be downloaded
    counts as missing), a CUDA GPU for `device: cuda` or `load_in_4bit`, the key of an
    OpenAI variant. An embedded GGUF (and the folder dequantised from it) is loadable
    whenever its package (the demo extra) is installed. A relative path with no home given
    is not judged."""
    from pipelines.inference.kinds import kind_of

    reason = kind_of(variant).unloadable(variant, home)
    return None if reason is None else f"variant {variant.name!r}: {reason}"


def compare(session: ChatSession, text: str, combos: list[Combo],
            options: GenerationOptions | None = None) -> Iterator[tuple[int, Any]]:
    """Ask one question of each combination, one after another (they share the device),
    in a `compare` session: yields (combination index, event). Backends come from the
    session's pool, which keeps them loaded across calls (and for the chat)."""
    for index, combo in enumerate(combos):
        session.use(combo.variant)
        session.rag = combo.rag
        stream = session.send(text, options, new_question=index == 0)
        try:
            for event in stream:
                yield index, event
        finally:
            stream.close()
