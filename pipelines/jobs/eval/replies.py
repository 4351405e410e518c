"""The eval job's reply records: their ids (a digest of everything that shapes a reply, so
a rerun keeps what is there), replies.jsonl read and appended (a resumable log:
pipelines.files), what each record measures (style, the fact figure), and the reply's
conversation as messages of an `eval` session in the store."""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.config import EvalJob
from pipelines.files import append_jsonl, read_jsonl_lines
from pipelines.jobs import JobContext
from pipelines.jobs.eval.setup import NAMESPACE, Combo, Item, Setup
from pipelines.judge.verdict import digest_text
from pipelines.style import reply_style
from store.store import utcnow


def reply_id(cfg: EvalJob, combo: Combo, item: Item, sample: int, shape: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(
        [cfg.name, combo.id, item.set, item.id, str(sample), shape])))


def shape(cfg: EvalJob, combo: Combo, item: Item, sample: int, persona: Any) -> str:
    """A digest of everything that shapes a reply: the variant's config, retrieval, the
    persona's prompts, the generation settings and the item's turns. A change makes a new
    id, so an old reply is never taken for a new one."""
    temperature = cfg.temperature if cfg.samples > 1 else 0.0
    return digest_text(combo.variant.model_dump_json(), combo.rag, persona.prompts.system,
                       persona.prompts.system_rag, cfg.max_new_tokens, temperature,
                       cfg.seed + sample, item.turns, item.scenario or "",
                       cfg.simulator or "", cfg.simulated_turns if item.set == "simulated" else 0)


def read_replies(path: Path) -> dict[str, dict[str, Any]]:
    """The replies a previous run wrote, by id; a line torn by a kill is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in read_jsonl_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            out[row["id"]] = row
    return out


def _append(path: Path, row: dict[str, Any]) -> None:
    """One record at the end of a resumable log, fsynced; a line torn by a kill is ended
    first (pipelines.files.append_jsonl), so this record is kept."""
    append_jsonl(path, row)


def missing(key: tuple[str, str, str, int], rid: str) -> dict[str, Any]:
    combo, set_name, item_id, sample = key
    return {"id": rid, "combo": combo, "set": set_name, "question_id": item_id,
            "sample": sample, "text": "", "stop": "error", "error": "no reply"}


def new_record(combo: Combo, item: Item, sample: int, rid: str) -> dict[str, Any]:
    return {"id": rid, "combo": combo.id, "variant": combo.variant.name, "rag": combo.rag,
            "set": item.set, "question_id": item.id, "sample": sample,
            "knowledge_ids": item.knowledge_ids, "expect": item.expect,
            "error": None, "tokens": 0, "seconds": 0.0, "turn_stops": []}


def measure(setup: Setup, record: dict[str, Any], item: Item, history: list[dict[str, str]],
            text: str, final: Any, rendered: str, hits: list[Any] | None,
            seconds: float) -> None:
    """The reply's text, transcript, stop, speed, prompt and retrieval into its record,
    and its style record (pipelines.style.reply_style: the console's badges, counted by
    pipelines.evaluation.figures) and fact figure."""
    stop = final.stop_reason if final is not None else "error"
    record.update({
        "seconds": round(seconds, 3),
        "question": history[-2]["content"] if len(history) >= 2 else item.question,
        "transcript": history,
        "text": text if not record["error"] else "",
        "stop": stop if not record["error"] else "error",
        "tokens_per_s": final.tokens_per_s if final is not None else None,
        "rendered_prompt": rendered,
        "retrieved_ids": [h.fact_id for h in hits] if hits is not None else None,
    })
    record["style"] = reply_style(record["text"], setup.persona.speech,
                                  record["stop"]).record()  # newlines True: no line break
    record["fact_hit"] = (fact_hit(record["text"], item.expect)
                          if item.expect and not record["error"] else None)


def _loose(text: str) -> str:
    return re.sub(r"[\s・]", "", unicodedata.normalize("NFKC", text))


def fact_hit(text: str, expect: Sequence[str]) -> bool:
    """Whether a reply states the fact: one of the question's `expect` strings occurs in it,
    both NFKC-normalised without spaces and ・ (レミゼ in 「レ・ミゼ」, ４ in 「4」)."""
    reply = _loose(text)
    return any(_loose(e) in reply for e in expect if _loose(e))


def store_reply(ctx: JobContext, cfg: EvalJob, combo: Combo, persona: str,
                record: dict[str, Any]) -> None:
    """The reply's conversation as messages of an `eval` session (one per run and
    combination), ids derived from the reply's, so a rerun overwrites rather than adds."""
    session = str(uuid.uuid5(NAMESPACE, f"{cfg.name}\x1f{combo.id}"))
    now = utcnow()
    ctx.store.upsert("sessions", [{
        "id": session, "persona": persona, "variant": combo.variant.name, "kind": "eval",
        "title": f"eval {cfg.name} · {combo.label}", "created_at": now, "updated_at": now,
        "meta_json": json.dumps({"eval": cfg.name, "combo": combo.id, "run_id": ctx.run_id}),
    }])
    rows = []
    transcript = record.get("transcript") or []
    base_seq = uuid.UUID(record["id"]).int % 10**12 * 100  # stable across reruns
    for index, message in enumerate(transcript):
        last = (index == len(transcript) - 1 and message["role"] == "assistant"
                and not record.get("error"))
        rows.append({
            "id": record["id"] if last else f"{record['id']}:{index}",
            "session_id": session, "seq": base_seq + index, "role": message["role"],
            "content": message["content"], "status": "complete", "variant": combo.variant.name,
            "rag": combo.rag, "created_at": now,
            **({"rendered_prompt": record.get("rendered_prompt"),
                "retrieved_ids": record.get("retrieved_ids"), "stop_reason": record.get("stop"),
                "completion_tokens": record.get("tokens"),
                "tokens_per_s": record.get("tokens_per_s")} if last else {}),
        })
    if record.get("error"):
        rows.append({"id": record["id"], "session_id": session, "seq": base_seq + 99,
                     "role": "assistant", "content": "", "status": "error",
                     "variant": combo.variant.name, "rag": combo.rag, "created_at": now,
                     "error": record["error"], "stop_reason": "error"})
    if rows:
        ctx.store.upsert("messages", rows)
