"""Training data from what the store holds: `kyara data export sft|dpo|kto|labels`.

Formats (`trl`, TRL's conversational forms, or `sharegpt`):

    sft     trl: {"messages": [...]}              sharegpt: {"conversations": [{from, value}]}
    dpo     trl: {"prompt": [...], "chosen": [assistant], "rejected": [assistant]}
            sharegpt: {"conversations": [...], "chosen": {from, value}, "rejected": {...}}
    kto     trl: {"prompt": [...], "completion": [assistant], "label": bool}
            sharegpt: {"conversations": [..., reply], "kto_tag": bool}
    labels  {"message_id", "criterion", "score", "rater", "question", "reply", "prompt", ...}

Every row also keeps where it came from: `source` (human / judge / style), `origin` (the
session kind, a file, an eval run), `ids` (session, messages, preference), `variants` and
the `rendered_prompt` (the exact text the model was given, where it is known).

Sources:
- **sft** is built from the chats (and compare sessions): each visible reply
  (feedback.visible_reply_ids: the chosen alternative, the edited text) with the
  conversation before it. `min_score` keeps only replies labelled at least that on every
  labelled criterion, or thumbs up (never a thumbs-down one); with source "judge" the
  judge's scores are the labels, and the eval job's replies count too. A reply that lost
  a human vote (blind A/B) is left out.
- **dpo / kto** come from the preferences table: human votes for source "human", and for
  source "judge" the eval job's pairwise verdicts (`judge_preferences`): each combination
  against the reference, both orders, a disagreement being a tie (pipelines/judge/pairwise).
  Ties go into no dpo or kto row. kto also takes the thumbs labels of human source.
- **labels** is every human label with its reply and question.

The eval run files read for the judge's pairs (replies.jsonl, verdicts.jsonl) are checked
row by row: a bad row is one line naming the file and the row (ConfigError). A dpo / kto
export is a preference file the prefer job reads as it is
(pipelines/training/preference.read_preferences).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import feedback as fb
from pipelines import turn
from pipelines.config import ConfigError, read_text
from pipelines.files import jsonl_lines
from pipelines.home import EvalFiles, Home
from store import Store, quote

KINDS = ("sft", "dpo", "kto", "labels")
SOURCES = ("human", "judge")
FORMATS = ("trl", "sharegpt")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
PAIRWISE = "pairwise:"
_NAMESPACE = uuid.UUID("9c4d7e21-3b5a-4f08-a6c1-2e8f0d7b5a93")


@dataclass
class Export:
    """What an export made: the rows and a few counts for the command to print."""

    kind: str
    rows: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        extra = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        return f"{len(self.rows)} {self.kind} rows" + (f" ({extra})" if extra else "")


def export(store: Store, kind: str, *, source: str = "human", min_score: int | None = None,
           fmt: str = "trl", eval_dirs: Sequence[Path] = ()) -> Export:
    """The rows of one export (nothing written). `eval_dirs`: eval output folders whose
    pairwise verdicts are the judge's preferences (see judge_preferences)."""
    if kind not in KINDS:
        raise ConfigError(f"export: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if source not in SOURCES:
        raise ConfigError(f"export: --source must be one of {', '.join(SOURCES)}, "
                          f"not {source!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"export: --format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if min_score is not None and not 1 <= min_score <= 7:
        raise ConfigError(f"export: --min-score is 1 to 7, not {min_score}")
    if kind == "labels":
        if fmt != "trl" or source != "human":
            raise ConfigError("export labels: only the human labels, in kyara's own format "
                              "(no --format sharegpt, no --source judge)")
        return label_export(store)
    if kind == "sft":
        return sft_export(store, source=source, min_score=min_score, fmt=fmt)
    if min_score is not None:
        raise ConfigError(f"export {kind}: --min-score applies to sft only")
    prefs = (fb.preference_rows(store, "human") if source == "human"
             else judge_preferences(store, eval_dirs) + fb.preference_rows(store, "judge"))
    if kind == "dpo":
        return dpo_export(prefs, fmt=fmt)
    return kto_export(store, prefs, source=source, fmt=fmt)


# --- sft ----------------------------------------------------------------------------------


def conversations(store: Store, kinds: Sequence[str] = ("chat", "compare")
                  ) -> Iterator[tuple[dict[str, Any], dict[str, Any], list[dict[str, str]]]]:
    """(session, reply row, the messages before it) for every visible, complete, non-empty
    reply of the sessions of `kinds`. In a chat the messages before a reply are the earlier
    exchanges (user turn and visible reply) and its user turn; a compare question stands
    alone; an eval session holds one item per block of 100 seqs."""
    for session in store.rows("sessions", order_by="created_at"):
        if session["kind"] in kinds:
            yield from _walk(store, session, set())


def reply_contexts(store: Store, message_ids: Iterable[str]
                   ) -> dict[str, tuple[dict[str, Any], dict[str, Any], list[dict[str, str]]]]:
    """message id -> (session, reply row, the messages before it) for these replies, shown
    or not (a reply labelled before another alternative was chosen keeps its context).
    Replies deleted since, or not complete, are left out."""
    wanted = set(message_ids)
    replies = fb._chunked_rows(store, "messages", "id", sorted(wanted))
    out = {}
    for sid in sorted({r["session_id"] for r in replies}):
        session = store.get("sessions", sid) or {"id": sid, "kind": "chat", "persona": None}
        for session_, reply, before in _walk(store, session, wanted):
            if reply["id"] in wanted:
                out[reply["id"]] = (session_, reply, before)
    return out


def _walk(store: Store, session: dict[str, Any], also: set[str]
          ) -> Iterator[tuple[dict[str, Any], dict[str, Any], list[dict[str, str]]]]:
    rows = sorted(store.rows("messages", where=f"session_id = {quote(session['id'])}"),
                  key=lambda r: (r["seq"], r["created_at"]))
    visible = fb.visible_among(store, [r for r in rows if r["role"] == "assistant"])
    pairs: list[tuple[str, str]] = []
    pending: dict[str, Any] | None = None
    block: int | None = None
    for row in rows:
        if session["kind"] == "eval" and row["seq"] // 100 != block:
            block, pairs, pending = row["seq"] // 100, [], None
        if row["role"] == "user":
            pending = row
        elif row["role"] == "assistant" and pending is not None:
            # what the model was sent with this reply: the one history rule (pipelines.turn)
            before = [*turn.history(pairs), {"role": "user", "content": pending["content"]}]
            shown = row["id"] in visible
            if (shown or row["id"] in also) and row["status"] == "complete" \
                    and row["content"].strip():
                yield session, row, before
            if shown and session["kind"] != "compare":  # as ChatSession.history() goes on
                if turn.seen(row):
                    pairs.append((pending["content"], row["content"]))
                pending = None


def judge_scores(store: Store, message_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """message -> criterion -> the judge's latest ok score (pairwise verdicts left out)."""
    out: dict[str, dict[str, int]] = {}
    rows = fb._chunked_rows(store, "judgments", "message_id", list(message_ids))
    for row in sorted(rows, key=lambda r: r["created_at"]):
        if row["status"] == "ok" and row["score"] is not None \
                and not row["criterion"].startswith(PAIRWISE):
            out.setdefault(row["message_id"], {})[row["criterion"]] = row["score"]
    return out


def passes(scores: Mapping[str, int], min_score: int) -> bool:
    """Thumbs up, or labelled on some criterion and at least `min_score` on every one;
    thumbs down never passes."""
    thumbs = scores.get(fb.THUMBS)
    if thumbs == fb.THUMBS_DOWN:
        return False
    criteria = [s for c, s in scores.items() if c != fb.THUMBS]
    if not all(s >= min_score for s in criteria):
        return False
    return thumbs == fb.THUMBS_UP or bool(criteria)


def sft_export(store: Store, *, source: str = "human", min_score: int | None = None,
               fmt: str = "trl") -> Export:
    kinds = ("chat", "compare", "eval") if source == "judge" else ("chat", "compare")
    found = list(conversations(store, kinds))
    ids = [reply["id"] for _, reply, _ in found]
    scores = fb.labels_for(store, ids) if source == "human" else judge_scores(store, ids)
    # a reply that lost a blind vote is not one to imitate (a tie is no loss)
    lost = {p["rejected_id"] for p in fb.preference_rows(store, "human") if not p["tie"]}
    rows, dropped, beaten = [], 0, 0
    for session, reply, before in found:
        if reply["id"] in lost:
            beaten += 1
            continue
        mine = scores.get(reply["id"], {})
        if min_score is not None and not passes(mine, min_score):
            dropped += 1
            continue
        messages = [*before, {"role": "assistant", "content": reply["content"]}]
        rows.append({
            "id": reply["id"], **_conversation(messages, fmt),
            "rendered_prompt": reply.get("rendered_prompt"),
            "source": source, "origin": session["kind"],
            "ids": {"session": session["id"], "message": reply["id"],
                    "edit_of": _edit_of(reply)},
            "variants": {"reply": reply.get("variant")},
            "scores": mine,
        })
    return Export("sft", rows, {"below --min-score": dropped, "lost a vote": beaten})


def _edit_of(reply: Mapping[str, Any]) -> str | None:
    try:
        return json.loads(reply.get("options_json") or "{}").get("edit_of")
    except (ValueError, AttributeError):
        return None


def _conversation(messages: Sequence[Mapping[str, str]], fmt: str) -> dict[str, Any]:
    if fmt == "sharegpt":
        return {"conversations": sharegpt(messages)}
    return {"messages": [dict(m) for m in messages]}


def sharegpt(messages: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    return [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]


# --- preferences: dpo and kto ---------------------------------------------------------------


def _provenance(pref: Mapping[str, Any]) -> dict[str, Any]:
    try:
        variants = json.loads(pref.get("variants_json") or "{}")
    except ValueError:
        variants = {}
    return {
        "rendered_prompt": pref.get("rendered_prompt"),
        "source": pref["source"], "origin": pref.get("origin", "preferences"),
        "criterion": pref.get("criterion"), "rater": pref.get("rater"),
        "ids": {"preference": pref["id"], "session": pref.get("session_id"),
                "chosen": pref.get("chosen_id"), "rejected": pref.get("rejected_id")},
        "variants": variants,
    }


def dpo_export(prefs: Sequence[Mapping[str, Any]], *, fmt: str = "trl") -> Export:
    rows, ties = [], 0
    for pref in prefs:
        if pref["tie"]:
            ties += 1
            continue
        prompt = json.loads(pref["prompt_json"])
        chosen = {"role": "assistant", "content": pref["chosen_text"]}
        rejected = {"role": "assistant", "content": pref["rejected_text"]}
        if fmt == "sharegpt":
            body: dict[str, Any] = {"conversations": sharegpt(prompt),
                                    "chosen": sharegpt([chosen])[0],
                                    "rejected": sharegpt([rejected])[0]}
        else:
            body = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
        rows.append({"id": pref["id"], **body, **_provenance(pref)})
    return Export("dpo", rows, {"ties left out": ties})


def _kto_row(id_: str, prompt: list[dict[str, str]], text: str, label: bool, fmt: str,
             provenance: dict[str, Any]) -> dict[str, Any]:
    reply = {"role": "assistant", "content": text}
    if fmt == "sharegpt":
        return {"id": id_, "conversations": sharegpt([*prompt, reply]), "kto_tag": label,
                **provenance}
    return {"id": id_, "prompt": prompt, "completion": [reply], "label": label, **provenance}


def kto_export(store: Store, prefs: Sequence[Mapping[str, Any]], *, source: str = "human",
               fmt: str = "trl") -> Export:
    """Each side of a (non-tie) preference, chosen True and rejected False; for source
    human also every thumbs-labelled reply (up True, down False). A reply and label met
    twice is one row."""
    rows, seen, ties = [], set(), 0
    for pref in prefs:
        if pref["tie"]:
            ties += 1
            continue
        prompt = json.loads(pref["prompt_json"])
        for side, label in (("chosen", True), ("rejected", False)):
            key = (pref.get(f"{side}_id") or pref[f"{side}_text"], label)
            if key in seen:
                continue
            seen.add(key)
            rows.append(_kto_row(f"{pref['id']}{'+' if label else '-'}", prompt,
                                 pref[f"{side}_text"], label, fmt, _provenance(pref)))
    thumbs = 0
    if source == "human":
        labelled = {r["message_id"]: r["score"] for r in fb.label_rows(store, fb.THUMBS)}
        for session, reply, before in conversations(store, ("chat", "compare")):
            if reply["id"] not in labelled:
                continue
            label = labelled[reply["id"]] == fb.THUMBS_UP
            key = (reply["id"], label)
            if key in seen:
                continue
            seen.add(key)
            thumbs += 1
            rows.append(_kto_row(f"{reply['id']}:thumbs", before, reply["content"], label, fmt, {
                "rendered_prompt": reply.get("rendered_prompt"), "source": "human",
                "origin": session["kind"], "criterion": fb.THUMBS, "rater": None,
                "ids": {"session": session["id"], "message": reply["id"]},
                "variants": {"reply": reply.get("variant")}}))
    return Export("kto", rows, {"from thumbs": thumbs, "ties left out": ties})


# --- the judge's pairwise verdicts as preferences --------------------------------------------


def eval_dirs(home: Path) -> list[Path]:
    """The eval output folders under <home>/evals (the eval job's default place)."""
    root = Home(home).evals
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(jsonl_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: invalid JSON: {exc.msg} "
                              f"(column {exc.colno})") from None


def judge_preferences(store: Store, dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """The eval job's pairwise verdicts as preference rows (not stored; ids derived from
    the run, the criterion and the two replies). Each verdict record of `verdicts.jsonl`
    (kind "pairwise": a combination against the reference, both orders, `outcome` win / tie
    / loss) becomes one, where both replies (from `replies.jsonl`) are messages in the
    store and the two orders' verdicts are in its judgments table."""
    out: list[dict[str, Any]] = []
    for folder in dirs:
        verdicts_path, replies_path = folder / EvalFiles.VERDICTS, folder / EvalFiles.REPLIES
        if not verdicts_path.is_file() or not replies_path.is_file():
            continue
        replies: dict[tuple[str, str, str, int], dict[str, Any]] = {}
        for number, r in _jsonl(replies_path):
            if not isinstance(r, dict) or not {"id", "combo", "set", "question_id",
                                               "sample"} <= set(r):
                raise ConfigError(f"{replies_path}:{number}: not an eval reply record")
            replies[(r["combo"], r["set"], r["question_id"], r["sample"])] = r
        records = []
        for number, v in _jsonl(verdicts_path):
            if not isinstance(v, dict):
                raise ConfigError(f"{verdicts_path}:{number}: not a verdict record")
            if v.get("kind") != "pairwise" or v.get("outcome") not in ("win", "tie", "loss"):
                continue
            missing = {"combo", "reference", "set", "question_id", "sample", "criterion"} - set(v)
            if missing:
                raise ConfigError(f"{verdicts_path}:{number}: a pairwise verdict without "
                                  f"{', '.join(sorted(missing))}")
            key = (v["set"], v["question_id"], v["sample"])
            mine, ref = replies.get((v["combo"], *key)), replies.get((v["reference"], *key))
            if mine is not None and ref is not None:
                records.append((v, mine, ref))
        ids = sorted({r["id"] for _, a, b in records for r in (a, b)})
        stored = {m["id"]: m for m in fb._chunked_rows(store, "messages", "id", ids)}
        judged = {(j["message_id"], j["criterion"]) for j in fb._chunked_rows(
            store, "judgments", "message_id", ids) if j["status"] == "ok"}
        for v, mine, ref in records:
            if mine["id"] not in stored or ref["id"] not in stored:
                continue
            if (mine["id"], PAIRWISE + v["criterion"]) not in judged:
                continue
            a, b = stored[mine["id"]], stored[ref["id"]]
            chosen, rejected = (b, a) if v["outcome"] == "loss" else (a, b)
            names = {a["id"]: v["combo"], b["id"]: v["reference"]}
            transcript = mine.get("transcript") or []
            prompt = [{"role": m["role"], "content": m["content"]} for m in transcript[:-1]] \
                or [{"role": "user", "content": mine.get("question") or ""}]
            out.append({
                "id": str(uuid.uuid5(_NAMESPACE, "\x1f".join(
                    [str(folder.name), v["criterion"], a["id"], b["id"]]))),
                "session_id": a["session_id"], "prompt_json": json.dumps(prompt,
                                                                         ensure_ascii=False),
                "chosen_id": chosen["id"], "rejected_id": rejected["id"],
                "chosen_text": chosen["content"], "rejected_text": rejected["content"],
                "tie": v["outcome"] == "tie", "source": "judge", "rater": None,
                "criterion": v["criterion"],
                "variants_json": json.dumps({"chosen": names[chosen["id"]],
                                             "rejected": names[rejected["id"]]}),
                "rendered_prompt": chosen.get("rendered_prompt"),
                "origin": f"eval {folder.name}",
            })
    return out


# --- labels ---------------------------------------------------------------------------------


def label_export(store: Store) -> Export:
    """Every human label with its reply, the question it answers and the conversation
    before it (where the reply is still stored)."""
    labels = fb.label_rows(store)
    context = reply_contexts(store, {r["message_id"] for r in labels})
    rows, gone = [], 0
    for label in labels:
        found = context.get(label["message_id"])
        if found is None:
            gone += 1
            continue
        session, reply, before = found
        question = next((m["content"] for m in reversed(before) if m["role"] == "user"), None)
        rows.append({
            "id": label["id"], "message_id": label["message_id"],
            "criterion": label["criterion"], "score": label["score"], "rater": label["rater"],
            "note": label["note"], "question": question, "reply": reply["content"],
            "prompt": before, "rendered_prompt": reply.get("rendered_prompt"),
            "source": "human", "origin": session["kind"],
            "ids": {"session": session["id"], "message": reply["id"]},
            "variants": {"reply": reply.get("variant")},
            "created_at": label["created_at"].isoformat(),
        })
    return Export("labels", rows, {"on deleted replies": gone})
