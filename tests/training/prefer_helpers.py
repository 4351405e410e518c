"""Preference data and prefer-job configs for the tiny models of conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

from tests.training.conftest import DIALOGUES


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def pair_rows() -> list[dict]:
    """Chosen: the persona's reply; rejected: a plain, rambling one."""
    rows = []
    for d in DIALOGUES:
        question, answer = d["messages"][0]["content"], d["messages"][1]["content"]
        rows.append({"id": d["id"], "prompt": user(question), "chosen": reply(answer),
                     "rejected": reply("えっと、それはね\nよくわからないよ")})
    return rows


def kto_rows() -> list[dict]:
    rows = []
    for row in pair_rows():
        rows.append({"id": row["id"] + "+", "prompt": row["prompt"],
                     "completion": row["chosen"], "label": True})
        rows.append({"id": row["id"] + "-", "prompt": row["prompt"],
                     "completion": row["rejected"], "label": False})
    return rows


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
                            + "\n" for r in rows), encoding="utf-8")
    return path


def prefer_job(**changes) -> dict:
    base = {"job": "prefer", "name": "tiny-prefer", "persona": "ayane", "base": "tiny-gemma",
            "method": "dpo", "epochs": 1, "max_steps": 2, "batch_size": 2,
            "learning_rate": 0.001, "max_seq_len": 256, "save_steps": 1, "logging_steps": 1,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
            "eval_questions": 2, "eval_max_new_tokens": 4}
    base.update(changes)
    return base
