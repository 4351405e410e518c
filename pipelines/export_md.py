"""A chat session as Markdown: each exchange with the variant, settings and scores that
produced it, so an export is evidence, not just text."""

from __future__ import annotations

from typing import Any


def session_markdown(session: Any) -> str:
    persona = session.persona
    lines = [f"# kyara session {session.session_id}", "",
             f"- persona: {persona.name} ({persona.id})", ""]
    rows = session.messages()
    judgments = _judgments(session.store, [r["id"] for r in rows if r["role"] == "assistant"])
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
        if row.get("error"):
            lines.append(f"> error: {row['error']}")
        lines.append("")
    return "\n".join(lines)


def _judgments(store: Any, message_ids: list[str]) -> dict[str, list[dict]]:
    if not message_ids:
        return {}
    from store.sql import quote_list

    out: dict[str, list[dict]] = {}
    for j in store.rows("judgments", where=f"message_id IN {quote_list(message_ids)}"):
        out.setdefault(j["message_id"], []).append(j)
    return out


