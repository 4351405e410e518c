"""The train job's mini-evaluation: load the base model and the adapter just written,
answer the eval questions with and without it, measure, and judge when a judge is set and
answers. Returns what the job stores: both sides' figures, the table, every reply.

Both sides run on one loaded copy: the trained adapter is loaded from the folder the job
wrote (so what is measured is what was saved), and the base answers with the adapter
disabled. Generation and figures are pipelines.evaluation's (greedy, batched, the persona's
speech rules as the console's badges read them); the targets are the quick-start's."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines.config import Persona, TrainJob
from pipelines.evaluation import (
    Figures,
    Reply,
    end_of_generation_ids,
    figures,
    generate,
    table,
)

# What the quick-start is measured against (issue 6), by Figures field.
TARGETS = {"ends_maru": "≥ 80%", "ojousama": "≥ 60%", "median_chars": "≤ 45",
           "stop_eos": "≥ 95%"}


def run_mini_eval(ctx: Any, cfg: TrainJob, persona: Persona, base_name: str, name: str,
                  model_source: Path | str, adapter: Path, questions: list[str], template: str,
                  end_id: int, cuda: bool, attn_implementation: str | None = None
                  ) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipelines.inference.loading import default_dtype, load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(model_source)
    # the loader chat uses: the figures come from the model chat serves (eager for Gemma)
    model = load_causal_lm(model_source, dtype=default_dtype(cuda),
                           attn_implementation=attn_implementation)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.to("cuda" if cuda else "cpu").eval()
    # end_id, the terminator training taught, is <end_of_turn> or EOS: always among these
    end_ids = end_of_generation_ids(model, tokenizer)
    end_ids.setdefault(end_id, tokenizer.convert_ids_to_tokens(end_id))
    how = {"template": template, "system": persona.prompts.system if cfg.system_prompt else None,
           "max_new_tokens": cfg.eval_max_new_tokens, "end_ids": end_ids}
    with model.disable_adapter():
        before_replies = generate(model, tokenizer, questions, **how)
    after_replies = generate(model, tokenizer, questions, **how)
    before = figures(base_name, before_replies, persona.speech)
    after = figures(name, after_replies, persona.speech)
    del model
    _judge(ctx, cfg, questions, before, before_replies, after, after_replies)
    return {
        "before": before.to_dict(), "after": after.to_dict(),
        "table": table(before, after, TARGETS),
        "replies": [{"question": q, "base": asdict(b), "trained": asdict(a)}
                    for q, b, a in zip(questions, before_replies, after_replies, strict=True)],
    }


def _judge(ctx: Any, cfg: TrainJob, questions: list[str], before: Figures,
           before_replies: list[Reply], after: Figures, after_replies: list[Reply]) -> None:
    """Mean personality score per side, or a note saying why there is none."""
    if not cfg.judge:
        after.notes.append("judge skipped: no judge set in the job (judge: NAME)")
        return
    import asyncio

    try:
        from pipelines.judge import Interaction, Judge, JudgeError

        judge = Judge.open(ctx.workspace, cfg.judge, cfg.persona, criteria=["personality"],
                           store=ctx.store)
    except Exception as exc:  # no key, unknown judge: the evaluation still stands
        after.notes.append(f"judge skipped: {' '.join(str(exc).split())[:200]}")
        return

    async def score(replies: list[Reply], tag: str) -> float | None:
        items = [Interaction.from_pair(q, r.text or "…", id=f"{ctx.run_id}-{tag}-{i}")
                 for i, (q, r) in enumerate(zip(questions, replies, strict=True))]
        results = await judge.score_items(items, ["personality"])
        scores = [v.score for v in results.values() if v.status == "ok" and v.score is not None]
        return sum(scores) / len(scores) if scores else None

    async def both() -> tuple[float | None, float | None]:
        try:
            return await score(before_replies, "base"), await score(after_replies, "tuned")
        finally:
            await judge.aclose()

    try:
        before.judge, after.judge = asyncio.run(both())
    except (JudgeError, OSError) as exc:
        after.notes.append(f"judge skipped: {' '.join(str(exc).split())[:200]}")
        return
    if before.judge is None and after.judge is None:
        after.notes.append(f"judge {cfg.judge} gave no score (unreachable or failing)")
