"""A chat session as Markdown: each exchange with the variant, settings and scores that
produced it, so an export is evidence, not just text.

The transcript is the conversation as it continued (each turn's chosen reply: a chosen
alternative, an edited text); under it, the replies of that turn that were not chosen, the
original of an edit, and the person's own ratings beside the judge's."""

from __future__ import annotations

import json
from typing import Any


def session_markdown(session: Any) -> str:
    persona = session.persona
    lines = [f"# kyara session {session.session_id}", "",
             f"- persona: {persona.name} ({persona.id})", ""]
    from pipelines.feedback import labels_for

    every = session.messages()
    rows = session.visible_messages()
    shown = {r["id"] for r in rows}
    replies = [r["id"] for r in rows if r["role"] == "assistant"]
    judgments = _judgments(session.store, replies)
    labels = labels_for(session.store, replies) if replies else {}
    for row in rows:
        if row["role"] == "user":
            lines += [f"**あなた**: {row['content']}", ""]
            continue
        settings = [f"variant {row.get('variant')}", f"RAG {'on' if row.get('rag') else 'off'}",
                    f"stop {row.get('stop_reason')}"]
        if row.get("tokens_per_s"):
            settings.append(f"{row['tokens_per_s']:.1f} tok/s")
        if row["status"] != "complete":
            settings.append(row["status"])
        lines += [f"**{persona.name}**: {row['content']}", "", f"> {', '.join(settings)}"]
        if row.get("retrieved_ids"):
            lines.append(f"> retrieved: {', '.join(row['retrieved_ids'])}")
        for j in judgments.get(row["id"], []):
            score = j["score"] if j["status"] == "ok" else j["status"]
            lines.append(f"> {j['criterion']}: {score} ({j['judge_model']})")
        if labels.get(row["id"]):
            mine = labels[row["id"]]
            lines.append("> you: " + ", ".join(
                ("👍" if v > 0 else "👎") if c == "thumbs" else f"{c} {v}"
                for c, v in sorted(mine.items())))
        if row.get("error"):
            lines.append(f"> error: {row['error']}")
        edit_of = _options(row).get("edit_of")
        for other in every:
            if (other["role"] != "assistant" or other["seq"] != row["seq"]
                    or other["id"] in shown):
                continue
            what = ("original, before your edit" if other["id"] == edit_of
                    else f"alternative not chosen, variant {other.get('variant')}")
            lines.append(f"> {what}: {_one_line(other['content'])}")
        lines.append("")
    return "\n".join(lines)


def _options(row: dict[str, Any]) -> dict[str, Any]:
    try:
        options = json.loads(row.get("options_json") or "{}")
    except ValueError:
        return {}
    return options if isinstance(options, dict) else {}


def _one_line(text: str) -> str:
    return " ".join((text or "").split()) or "(empty)"


def _judgments(store: Any, message_ids: list[str]) -> dict[str, list[dict]]:
    if not message_ids:
        return {}
    from store.sql import quote_list

    out: dict[str, list[dict]] = {}
    for j in store.rows("judgments", where=f"message_id IN {quote_list(message_ids)}"):
        out.setdefault(j["message_id"], []).append(j)
    return out


