"""Table schemas (pyarrow), column defaults and allowed values.

Conventions, the same in every table:
- `id` is a client-made uuid4 string (store.new_id()), the merge key of every upsert.
- Timestamps are `timestamp[us, tz=UTC]`; the store accepts timezone-aware datetimes only
  (a naive one would be silently taken as UTC by pyarrow) and returns aware UTC datetimes.
- Structured extras are JSON text in `*_json` columns: the caller dumps and loads them, so
  a row reads back exactly as it was written.
- Columns marked nullable=False must be given unless DEFAULTS has a value for them.

The `*_V1` schemas are what migration 1 creates, the `*_V2` ones what migration 2 adds; all
are FROZEN: a later schema change is a new migration (store/migrations.py). Writes are checked against each table's live schema,
so a column added by a migration is writable without touching this file.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _optional(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


META = pa.schema([
    _required("id", pa.string()),        # the key, e.g. "schema_version"
    _required("value", pa.string()),
    _required("updated_at", TIMESTAMP),
])

SESSIONS_V1 = pa.schema([
    _required("id", pa.string()),
    _required("persona", pa.string()),
    _optional("variant", pa.string()),   # null for a compare session (variants are per message)
    _required("kind", pa.string()),      # see CHOICES
    _optional("title", pa.string()),
    _required("created_at", TIMESTAMP),
    _required("updated_at", TIMESTAMP),
    _optional("meta_json", pa.string()),
])

MESSAGES_V1 = pa.schema([
    _required("id", pa.string()),
    _required("session_id", pa.string()),
    _required("seq", pa.int64()),        # order within the session; rows() does not keep order
    _required("role", pa.string()),
    _required("content", pa.string()),
    _required("status", pa.string()),
    _optional("variant", pa.string()),
    _optional("adapter", pa.string()),
    _required("rag", pa.bool_()),
    _optional("rendered_prompt", pa.string()),
    # null = no retrieval was done; [] = retrieval ran and found nothing.
    _optional("retrieved_ids", pa.list_(pa.string())),
    _optional("options_json", pa.string()),
    _optional("prompt_tokens", pa.int64()),
    _optional("completion_tokens", pa.int64()),
    _optional("ttft_ms", pa.float64()),
    _optional("tokens_per_s", pa.float64()),
    _optional("stop_reason", pa.string()),
    _optional("error", pa.string()),
    _required("created_at", TIMESTAMP),
])

JUDGMENTS_V1 = pa.schema([
    _required("id", pa.string()),
    _required("message_id", pa.string()),
    _required("criterion", pa.string()),
    _required("judge_model", pa.string()),
    _required("prompt_version", pa.string()),
    _required("status", pa.string()),
    _optional("score", pa.int64()),          # null unless status is "ok"
    _optional("weighted_score", pa.float64()),
    _optional("reasoning", pa.string()),
    _optional("raw_text", pa.string()),
    _optional("error_kind", pa.string()),
    _required("tokens", pa.int64()),
    _optional("latency_ms", pa.float64()),
    _required("attempts", pa.int64()),
    _optional("cache_key", pa.string()),
    _required("created_at", TIMESTAMP),
])

RUNS_V1 = pa.schema([
    _required("id", pa.string()),
    _required("kind", pa.string()),          # job kind: "finetune", "merge", "export", ...
    _required("name", pa.string()),
    _optional("config_path", pa.string()),
    _optional("run_dir", pa.string()),
    _required("status", pa.string()),        # free-form: the job runner owns its states
    _optional("pid", pa.int64()),
    _required("created_at", TIMESTAMP),
    _required("updated_at", TIMESTAMP),
    _optional("summary_json", pa.string()),
])

VARIANTS_V1 = pa.schema([
    _required("id", pa.string()),
    _required("name", pa.string()),
    _required("backend", pa.string()),
    _optional("base", pa.string()),
    _optional("adapter", pa.string()),
    _optional("path", pa.string()),
    _optional("config_json", pa.string()),
    _optional("source_run_id", pa.string()),
    _required("created_at", TIMESTAMP),
])

# Created by migration 1, in this order.
TABLES_V1: dict[str, pa.Schema] = {
    "sessions": SESSIONS_V1,
    "messages": MESSAGES_V1,
    "judgments": JUDGMENTS_V1,
    "runs": RUNS_V1,
    "variants": VARIANTS_V1,
}

# --- version 2: human feedback (labels, preferences, alternatives, edits) ---------------

LABELS_V2 = pa.schema([
    _required("id", pa.string()),            # derived from (message, criterion, rater): one each
    _required("message_id", pa.string()),
    _required("criterion", pa.string()),     # a judge criterion's name, or "thumbs"
    _required("score", pa.int64()),          # 1-7 on a criterion; thumbs: 1 = down, 2 = up
    _required("rater", pa.string()),
    _optional("note", pa.string()),
    _required("created_at", TIMESTAMP),
])

PREFERENCES_V2 = pa.schema([
    _required("id", pa.string()),
    _optional("session_id", pa.string()),
    _required("prompt_json", pa.string()),   # the messages up to and including the user turn
    _optional("chosen_id", pa.string()),     # message ids; null for file-imported rows
    _optional("rejected_id", pa.string()),
    _required("chosen_text", pa.string()),
    _required("rejected_text", pa.string()),
    _required("tie", pa.bool_()),            # a tie: chosen / rejected are just the two sides
    _required("source", pa.string()),        # see CHOICES
    _optional("rater", pa.string()),
    _optional("criterion", pa.string()),
    _required("variants_json", pa.string()),  # {"chosen": variant, "rejected": variant}
    _optional("rendered_prompt", pa.string()),
    _required("created_at", TIMESTAMP),
])

ALTERNATIVES_V2 = pa.schema([
    _required("id", pa.string()),
    _required("group_id", pa.string()),      # the id of the group's first reply
    _required("message_id", pa.string()),
    _required("position", pa.int64()),       # 0 = the original
    _required("chosen", pa.bool_()),         # the one that continues the conversation
    _required("created_at", TIMESTAMP),
])

EDITS_V2 = pa.schema([
    _required("id", pa.string()),
    _required("message_id", pa.string()),    # the reply edited
    _required("edited_id", pa.string()),     # the new message row holding the edited text
    _required("original_text", pa.string()),
    _required("edited_text", pa.string()),
    _required("created_at", TIMESTAMP),
])

# Created by migration 2, in this order.
TABLES_V2: dict[str, pa.Schema] = {
    "labels": LABELS_V2,
    "preferences": PREFERENCES_V2,
    "alternatives": ALTERNATIVES_V2,
    "edits": EDITS_V2,
}

KNOWLEDGE = "knowledge"
META_TABLE = "meta"


# Schema metadata key on the knowledge table: when it was created (ns). Together with the
# lance version it tells a cache that the table changed, even across drop and re-create.
CREATED_NS = b"kyara.created_ns"


def knowledge_schema(dim: int, created_ns: int = 0) -> pa.Schema:
    """The knowledge table: its vector width is the embedder's, fixed when it is created."""
    return pa.schema([
        _required("id", pa.string()),
        _required("persona", pa.string()),
        _optional("fact_id", pa.string()),   # the fact's id in the persona's knowledge file
        _optional("topic", pa.string()),
        _required("text", pa.string()),
        _required("content_hash", pa.string()),
        _required("embedder", pa.string()),
        _required("vector", pa.list_(pa.float32(), dim)),
        # The word index (pipelines/retrieval/analysis.py): the normalised content words and
        # synonym groups of the text and its asks, space-separated. A table without it was
        # written by an earlier kyara: index_persona re-creates it.
        _optional("terms", pa.string()),
        _optional("asks", pa.list_(pa.string())),  # the questions the fact answers
        _optional("ask_vectors", pa.list_(pa.list_(pa.float32(), dim))),  # one per ask
    ], metadata={CREATED_NS: str(created_ns).encode()})


# What a full-text search returns: every knowledge column but the vector.
KNOWLEDGE_TEXT_COLUMNS = ("id", "persona", "fact_id", "topic", "text", "content_hash", "embedder")


def vector_dim(schema: pa.Schema) -> int:
    return schema.field("vector").type.list_size


# Every table known to the store (knowledge has no fixed schema here: see knowledge_schema).
TABLE_NAMES = (*TABLES_V1, *TABLES_V2, KNOWLEDGE, META_TABLE)

# Filled in when a row leaves a column out (or gives None). NOW means the write time.
NOW = object()
DEFAULTS: dict[str, dict[str, object]] = {
    "sessions": {"kind": "chat", "created_at": NOW},
    "messages": {"content": "", "status": "complete", "rag": False, "created_at": NOW},
    "judgments": {"tokens": 0, "attempts": 1, "created_at": NOW},
    "runs": {"created_at": NOW},
    "variants": {"created_at": NOW},
    "labels": {"created_at": NOW},
    "preferences": {"tie": False, "created_at": NOW},
    "alternatives": {"chosen": False, "created_at": NOW},
    "edits": {"created_at": NOW},
    "knowledge": {},
    "meta": {},
}

# Columns the store sets to the write time on every upsert, whatever the row says: a
# get -> modify -> upsert round trip must not keep a stale updated_at.
TOUCHED = ("updated_at",)

# Closed vocabularies, checked on write so a typo cannot reach the table.
CHOICES: dict[tuple[str, str], frozenset[str]] = {
    ("sessions", "kind"): frozenset({"chat", "compare", "eval"}),  # eval: an eval job's replies
    ("messages", "role"): frozenset({"user", "assistant", "system"}),
    ("messages", "status"): frozenset({"complete", "incomplete", "error"}),
    ("judgments", "status"): frozenset({"ok", "invalid", "failed"}),
    # human: a vote in the console or a file; judge: the eval job's pairwise verdicts;
    # style: pairs ranked by the deterministic style checks
    ("preferences", "source"): frozenset({"human", "judge", "style"}),
}
