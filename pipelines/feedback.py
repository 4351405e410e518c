"""Human feedback on replies: labels (1-7 per criterion, thumbs), preferences (A / B /
tie), alternatives (regenerated replies, one of them chosen) and edits, in the store's
version-2 tables (store/schemas.py).

Every write checks that the messages it names still exist and holds the store's write lock
from that check to the write (`Store.locked`), so a vote on a reply deleted meanwhile (by
this process or another) stores nothing. A bad value or a missing message raises
`FeedbackError`, one line, before anything is written.

Which reply continues a conversation: the assistant messages of a session fall into
groups (a reply and its alternatives, an edit among them); an assistant message in no group
is its own group. The chosen one of each group is *visible*: it is what the transcript
shows, what history() sends to the model and what an SFT export keeps.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from store import Store, new_id, quote, quote_list, utcnow

THUMBS = "thumbs"
THUMBS_DOWN, THUMBS_UP = 1, 2
SCALE = range(1, 8)               # a criterion's scores, as the judge's (1-7)
SOURCES = ("human", "judge", "style")
ROLES = ("system", "user", "assistant")
# Ids derived from what makes a row unique, so writing it again replaces it.
_NAMESPACE = uuid.UUID("5b0f7a4e-2d61-4c8a-9e3f-71c2d8a4b906")


class FeedbackError(ValueError):
    """A feedback write refused: a message that does not exist, or a bad value. One line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def derived_id(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(parts)))


# --- labels ------------------------------------------------------------------------------


def check_score(criterion: str, score: Any) -> int:
    """The score as an int, or FeedbackError: thumbs 1 (down) or 2 (up), a criterion 1-7."""
    if isinstance(score, bool) or not isinstance(score, int):
        raise FeedbackError(f"a {criterion} label needs a whole-number score, not {score!r}")
    if criterion == THUMBS:
        if score not in (THUMBS_DOWN, THUMBS_UP):
            raise FeedbackError(f"a thumbs label is 1 (down) or 2 (up), not {score}")
    elif score not in SCALE:
        raise FeedbackError(f"a {criterion} label is 1 to 7, not {score}")
    return score


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FeedbackError(f"{what} must be a non-empty name, not {value!r}")
    return value.strip()


def record_label(store: Store, message_id: str, criterion: str, score: int, *,
                 rater: str = "me", note: str | None = None) -> dict[str, Any]:
    """Label a reply: `score` on `criterion` (a judge criterion's name, or "thumbs").
    One label per (message, criterion, rater): a new one replaces the old. Returns the row."""
    criterion = _name(criterion, "the criterion")
    rater = _name(rater, "the rater")
    score = check_score(criterion, score)
    if note is not None and not isinstance(note, str):
        raise FeedbackError(f"a label's note must be text, not {type(note).__name__}")
    row = {"id": derived_id("label", message_id, criterion, rater), "message_id": message_id,
           "criterion": criterion, "score": score, "rater": rater, "note": note or None,
           "created_at": utcnow()}
    with store.locked("store a label"):
        _reply(store, message_id, "label")
        store.upsert("labels", [row])
    return row


def labels_for(store: Store, message_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """message id -> criterion -> score, for the messages that have labels (the latest
    label where several raters gave one)."""
    ids = list(dict.fromkeys(message_ids))
    out: dict[str, dict[str, int]] = {}
    if not ids:
        return out
    for row in sorted(_chunked_rows(store, "labels", "message_id", ids),
                      key=lambda r: r["created_at"]):
        out.setdefault(row["message_id"], {})[row["criterion"]] = row["score"]
    return out


def label_rows(store: Store, criterion: str | None = None) -> list[dict[str, Any]]:
    """Every stored label (of `criterion` if given), oldest first."""
    where = f"criterion = {quote(criterion)}" if criterion is not None else None
    return store.rows("labels", where=where, order_by="created_at")


# --- alternatives and edits ---------------------------------------------------------------


def add_alternative(store: Store, original_id: str, alternative_id: str) -> None:
    """`alternative_id` (an assistant message already written, in the same session) joins
    the group of `original_id` and becomes its chosen reply."""
    with store.locked("store an alternative reply"):
        original = _reply(store, original_id, "alternative")
        alternative = _reply(store, alternative_id, "alternative")
        if alternative["session_id"] != original["session_id"]:
            raise FeedbackError(f"message {alternative_id} is in another session than "
                                f"{original_id}")
        _join(store, original, alternative)


def alternatives(store: Store, message_id: str) -> list[dict[str, Any]]:
    """The message rows of `message_id`'s group in position order (the original first);
    just that message when it has no alternatives. Rows deleted since are left out."""
    message = _message(store, message_id, "alternatives")
    group = _group_rows(store, message_id)
    if not group:
        return [message]
    rows = {m["id"]: m for m in _chunked_rows(store, "messages", "id",
                                              [g["message_id"] for g in group])}
    return [rows[g["message_id"]] for g in group if g["message_id"] in rows]


def chosen_id(store: Store, message_id: str) -> str:
    """The id of the chosen reply of `message_id`'s group (itself when it has no group)."""
    group = _group_rows(store, message_id)
    return _visible_of(group, None) or message_id


def choose_alternative(store: Store, message_id: str) -> None:
    """Make `message_id` the chosen reply of its group: it continues the conversation."""
    with store.locked("choose an alternative reply"):
        _reply(store, message_id, "choice")
        group = _group_rows(store, message_id)
        if not group:
            return  # a reply without alternatives is already the chosen one
        store.upsert("alternatives", [{**g, "chosen": g["message_id"] == message_id}
                                      for g in group])


def record_edit(store: Store, message_id: str, new_text: str) -> dict[str, Any]:
    """Edit a reply: a new assistant message row (same session and seq, status complete,
    options_json {"edit_of": message_id}) holding `new_text`, and an edits row; the
    original is kept. The edited reply is its group's chosen one from now on. Returns the
    new message row."""
    if not isinstance(new_text, str) or not new_text.strip():
        raise FeedbackError("an edited reply cannot be empty")
    with store.locked("store an edit"):
        original = _reply(store, message_id, "edit")
        if new_text == original["content"]:
            raise FeedbackError(f"the edit of message {message_id} changes nothing")
        now = utcnow()
        edited = {
            "id": new_id(), "session_id": original["session_id"], "seq": original["seq"],
            "role": "assistant", "content": new_text, "status": "complete",
            "variant": original.get("variant"), "adapter": original.get("adapter"),
            "rag": bool(original.get("rag")), "rendered_prompt": original.get("rendered_prompt"),
            "retrieved_ids": original.get("retrieved_ids"),
            "options_json": json.dumps({"edit_of": message_id}), "stop_reason": "edit",
            "created_at": now,
        }
        store.upsert("messages", [edited])
        store.upsert("edits", [{"id": new_id(), "message_id": message_id,
                                "edited_id": edited["id"], "original_text": original["content"],
                                "edited_text": new_text, "created_at": now}])
        _join(store, original, edited)
    return edited


def edits_of(store: Store, message_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The edits rows (of the replies `message_ids`, if given), oldest first."""
    if message_ids is None:
        return store.rows("edits", order_by="created_at")
    rows = _chunked_rows(store, "edits", "message_id", list(message_ids))
    return sorted(rows, key=lambda r: r["created_at"])


def visible_reply_ids(store: Store, session_id: str) -> set[str]:
    """The assistant messages of the session that are the chosen one of their group (a
    reply without alternatives is its own group): what the transcript shows and history()
    sends to the model."""
    replies = store.rows("messages", where=f"session_id = {quote(session_id)} "
                         "AND role = 'assistant'")
    return visible_among(store, replies)


def visible_among(store: Store, replies: Sequence[Mapping[str, Any]]) -> set[str]:
    """Which of these assistant message rows are visible (see visible_reply_ids)."""
    present = {r["id"] for r in replies}
    if not present:
        return set()
    grouped = _chunked_rows(store, "alternatives", "message_id", list(present))
    group_ids = {g["group_id"] for g in grouped}
    groups: dict[str, list[dict[str, Any]]] = {}
    for g in _chunked_rows(store, "alternatives", "group_id", list(group_ids)):
        groups.setdefault(g["group_id"], []).append(g)
    in_group = {g["message_id"] for rows in groups.values() for g in rows}
    visible = present - in_group
    for rows in groups.values():
        rows.sort(key=lambda g: g["position"])
        chosen = _visible_of(rows, present)
        if chosen is not None:
            visible.add(chosen)
    return visible


# --- preferences --------------------------------------------------------------------------


def record_preference(store: Store, *, prompt: Sequence[Mapping[str, Any]],
                      chosen: Mapping[str, Any] | str, rejected: Mapping[str, Any] | str,
                      tie: bool, source: str, variants: Mapping[str, Any],
                      criterion: str | None = None, rater: str | None = None,
                      session_id: str | None = None,
                      rendered_prompt: str | None = None) -> dict[str, Any]:
    """Store one preference: `chosen` over `rejected` (or a tie: then they are just the two
    sides) after `prompt`, the messages up to and including the user's turn. chosen /
    rejected are message rows (dicts with id and content: they must still exist) or plain
    texts. `variants` is {"chosen": variant, "rejected": variant}. Returns the row."""
    row = preference_row(prompt=prompt, chosen=chosen, rejected=rejected, tie=tie,
                         source=source, variants=variants, criterion=criterion, rater=rater,
                         session_id=session_id, rendered_prompt=rendered_prompt)
    with store.locked("store a preference"):
        for side in ("chosen_id", "rejected_id"):
            if row[side] is not None:
                _message(store, row[side], "vote")
        store.upsert("preferences", [row])
    return row


def preference_row(*, prompt: Sequence[Mapping[str, Any]], chosen: Mapping[str, Any] | str,
                   rejected: Mapping[str, Any] | str, tie: bool, source: str,
                   variants: Mapping[str, Any], criterion: str | None = None,
                   rater: str | None = None, session_id: str | None = None,
                   rendered_prompt: str | None = None, id: str | None = None,
                   ) -> dict[str, Any]:
    """A checked preferences row (nothing written); FeedbackError names what is wrong."""
    messages = check_prompt(prompt)
    chosen_id_, chosen_text = _side(chosen, "chosen")
    rejected_id, rejected_text = _side(rejected, "rejected")
    if chosen_id_ is not None and chosen_id_ == rejected_id:
        raise FeedbackError(f"a preference needs two different replies, got {chosen_id_} twice")
    if not isinstance(tie, bool):
        raise FeedbackError(f"tie must be true or false, not {tie!r}")
    if source not in SOURCES:
        raise FeedbackError(f"a preference's source is one of {', '.join(SOURCES)}, "
                            f"not {source!r}")
    if not isinstance(variants, Mapping):
        raise FeedbackError("variants must map chosen and rejected to their variants")
    sides = {k: variants.get(k) for k in ("chosen", "rejected")}
    for key, value in sides.items():
        if value is not None and not isinstance(value, str):
            raise FeedbackError(f"the {key} variant must be a name, not {value!r}")
    return {
        "id": id or new_id(), "session_id": session_id,
        "prompt_json": json.dumps(messages, ensure_ascii=False),
        "chosen_id": chosen_id_, "rejected_id": rejected_id,
        "chosen_text": chosen_text, "rejected_text": rejected_text, "tie": tie,
        "source": source, "rater": rater, "criterion": criterion,
        "variants_json": json.dumps(sides, ensure_ascii=False),
        "rendered_prompt": rendered_prompt, "created_at": utcnow(),
    }


def check_prompt(prompt: Any) -> list[dict[str, str]]:
    """The prompt as [{role, content}], or FeedbackError: a non-empty list of messages that
    ends on the user's turn."""
    if not isinstance(prompt, Sequence) or isinstance(prompt, str) or not prompt:
        raise FeedbackError("the prompt must be a non-empty list of messages")
    out = []
    for index, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise FeedbackError(f"prompt message {index} is not a message")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise FeedbackError(f"prompt message {index} has role {role!r} (expected one of "
                                f"{', '.join(ROLES)})")
        if not isinstance(content, str):
            raise FeedbackError(f"prompt message {index} has no text")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise FeedbackError("the prompt does not end on the user's turn")
    return out


def preference_rows(store: Store, source: str | None = None) -> list[dict[str, Any]]:
    """Stored preferences (of `source` if given), oldest first."""
    where = f"source = {quote(source)}" if source is not None else None
    return store.rows("preferences", where=where, order_by="created_at")


# --- internals ----------------------------------------------------------------------------


def _side(value: Any, which: str) -> tuple[str | None, str]:
    if isinstance(value, str):
        text, id_ = value, None
    elif isinstance(value, Mapping):
        text, id_ = value.get("content"), value.get("id")
        if id_ is not None and (not isinstance(id_, str) or not id_):
            raise FeedbackError(f"the {which} reply has a bad id {id_!r}")
    else:
        raise FeedbackError(f"the {which} reply must be a message or a text, "
                            f"not {type(value).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise FeedbackError(f"the {which} reply is empty")
    return id_, text


def _message(store: Store, message_id: Any, doing: str) -> dict[str, Any]:
    if not isinstance(message_id, str) or not message_id:
        raise FeedbackError(f"no {doing} stored: bad message id {message_id!r}")
    row = store.get("messages", message_id)
    if row is None:
        raise FeedbackError(f"no {doing} stored: message {message_id} does not exist "
                            "(deleted?)")
    return row


def _reply(store: Store, message_id: Any, doing: str) -> dict[str, Any]:
    row = _message(store, message_id, doing)
    if row["role"] != "assistant":
        raise FeedbackError(f"no {doing} stored: message {message_id} is a {row['role']} "
                            "turn, not a reply")
    return row


def _group_rows(store: Store, message_id: str) -> list[dict[str, Any]]:
    """The alternatives rows of `message_id`'s group in position order ([] if none)."""
    mine = store.rows("alternatives", where=f"message_id = {quote(message_id)}")
    if not mine:
        return []
    group = store.rows("alternatives", where=f"group_id = {quote(mine[0]['group_id'])}")
    return sorted(group, key=lambda g: g["position"])


def _visible_of(group: Sequence[Mapping[str, Any]], present: set[str] | None) -> str | None:
    """The chosen member of a group (position order), among `present` messages if given;
    when the chosen one is gone, the last one left."""
    left = [g for g in group if present is None or g["message_id"] in present]
    if not left:
        return None
    chosen = [g for g in left if g["chosen"]]
    return (chosen[-1] if chosen else left[-1])["message_id"]


def _join(store: Store, original: Mapping[str, Any], newcomer: Mapping[str, Any]) -> None:
    """Put `newcomer` in `original`'s group (made with `original` at position 0 when it
    has none) as the chosen one. Called under the store lock."""
    group = _group_rows(store, original["id"])
    now = utcnow()
    if not group:
        group_id = original["id"]
        group = [{"id": derived_id("alt", group_id, group_id), "group_id": group_id,
                  "message_id": group_id, "position": 0, "chosen": True, "created_at": now}]
    group_id = group[0]["group_id"]
    rows = [{**g, "chosen": g["message_id"] == newcomer["id"]} for g in group]
    if not any(g["message_id"] == newcomer["id"] for g in group):  # else: already a member
        rows.append({"id": derived_id("alt", group_id, newcomer["id"]), "group_id": group_id,
                     "message_id": newcomer["id"],
                     "position": max(g["position"] for g in group) + 1, "chosen": True,
                     "created_at": now})
    store.upsert("alternatives", rows)


def _chunked_rows(store: Store, table: str, column: str, values: Sequence[str],
                  size: int = 500) -> list[dict[str, Any]]:
    """Rows whose `column` is one of `values`, read in chunks (an IN list has limits)."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(values), size):
        chunk = list(values[start:start + size])
        if chunk:
            out += store.rows(table, where=f"{column} IN {quote_list(chunk)}")
    return out
