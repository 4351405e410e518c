"""Pairs without a human: sampled replies scored by the style checks, best vs worst kept past
the margin, every sample kept in samples.jsonl, and a rerun samples nothing already there."""

from __future__ import annotations

import json
from types import SimpleNamespace

from pipelines.config import PairSettings, parse_job
from pipelines.jobs import JobContext, get_job
from pipelines.training.pairs import make_pairs, read_samples, sample, sampling_key
from pipelines.workspace import Workspace
from tests.training.prefer_helpers import prefer_job


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_pairs_keep_best_vs_worst_past_the_margin():
    settings = PairSettings(samples=3, margin=0.3)
    prompts = [{"id": i, "question": q, "prompt": [{"role": "user", "content": q}]}
               for i, q in (("a", "q1"), ("b", "q2"), ("c", "q3"))]
    scores = {"a": [0.9, 0.2, 0.5], "b": [0.6, 0.5, 0.6], "c": [0.9, 0.1, 0.1]}
    samples = {(pid, k): {"text": f"{pid}{k}" if pid != "c" or k == 0 else "", "score": s}
               for pid, values in scores.items() for k, s in enumerate(values)}
    pairs, counts = make_pairs(prompts, samples, settings)
    assert [p["id"] for p in pairs] == ["a"]
    assert pairs[0]["chosen"][0]["content"] == "a0" and pairs[0]["rejected"][0]["content"] == "a1"
    assert counts == {"prompts": 3, "below_margin": 1, "too_few": 1, "pairs": 1}


def test_pairs_stage_end_to_end_and_resume(train_configs, tmp_path):
    """The job samples, ranks and trains DPO on its pairs; a second run of the same job
    samples nothing again (samples.jsonl is read back)."""
    ws = Workspace.load(train_configs)
    job = prefer_job(pairs={"samples": 3, "temperature": 1.5, "max_new_tokens": 6,
                            "margin": 0.0, "limit": 4, "batch_size": 6},
                     eval_questions=0, max_steps=1)
    cfg = parse_job(job, "t")
    events = list(get_job("prefer").run(cfg, JobContext.create(ws, tmp_path / "r1")))
    assert events[-1].type == "done", events[-1]
    assert [e.stage for e in events if e.type == "stage"] == [
        "data", "model", "memory", "pairs", "load", "train", "save"]
    out = tmp_path / "home" / "runs" / "tiny-prefer"
    first = records(out / "samples.jsonl")
    assert len(first) == 12 and {r["k"] for r in first} == {0, 1, 2}
    assert all(0 <= r["score"] <= 1 and "ends" in r["checks"] for r in first)
    pairs = records(out / "pairs.jsonl")
    summary = events[-1].summary["pairs"]
    assert summary["samples"] == 12 and summary["pairs"] == len(pairs) >= 1
    assert all(p["scores"]["chosen"] >= p["scores"]["rejected"] for p in pairs)

    again = list(get_job("prefer").run(cfg, JobContext.create(ws, tmp_path / "r2")))
    assert again[-1].type == "done"
    assert records(out / "samples.jsonl") == first  # nothing sampled twice
    logs = " ".join(e.message for e in again if e.type == "log")
    assert "12 samples already in samples.jsonl" in logs


def test_sampling_is_seeded_and_resumes_a_half_written_file(tiny_gemma, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.training.examples import chat_template_for

    tok = AutoTokenizer.from_pretrained(tiny_gemma)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma, dtype=torch.float32).eval()
    template = chat_template_for(tok, "gemma2")
    settings = PairSettings(samples=2, temperature=1.2, max_new_tokens=5, batch_size=2)
    prompts = [{"id": f"p{i}", "question": q, "prompt": []}
               for i, q in enumerate(["お名前は？", "趣味は？", "夢は何ですか？"])]
    rules = SimpleNamespace(max_chars=80, target_chars=30, sentence_end="。", endings=["わ"])
    key = sampling_key({"m": "tiny"}, settings, 7)
    how = dict(seed=7, key=key, template=template, system=None, end_ids={tok.eos_token_id: "e"},
               rules=rules)
    whole = tmp_path / "whole"
    whole.mkdir()
    list(sample(model, tok, prompts, settings, out=whole, **how))
    cut = tmp_path / "cut"
    cut.mkdir()
    lines = (whole / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    # the first chunk complete, then a line cut short by a crash
    (cut / "samples.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10],
                                       encoding="utf-8")
    progress = list(sample(model, tok, prompts, settings, out=cut, **how))
    assert progress[-1] == (3, 3)
    assert read_samples(cut / "samples.jsonl", key) == read_samples(whole / "samples.jsonl", key)
    assert read_samples(cut / "samples.jsonl", "other-key") == {}


def test_a_judge_reorders_pairs_and_a_failed_verdict_leaves_style_alone(tmp_path, monkeypatch):
    """The judge's mean (1..7 -> 0..1) mixed with the style score; every verdict kept in
    judged.jsonl; a sample whose verdicts failed is ranked on style alone."""
    import pipelines.judge as judge_pkg

    seen = {}

    class FakeJudge:
        async def score_items(self, interactions, criteria):
            seen["criteria"] = criteria
            out = {}
            for item in interactions:
                good = "わ" in item.reply
                failed = item.reply == "failing"
                out[(item.id, criteria[0])] = SimpleNamespace(
                    status="failed" if failed else "ok", score=None if failed else
                    (7 if good else 1))
            return out

        async def aclose(self):
            seen["closed"] = True

    monkeypatch.setattr(judge_pkg.Judge, "open", classmethod(
        lambda cls, ws, name, persona, criteria, store: FakeJudge()))
    settings = PairSettings(samples=3, margin=0.2, judge="fake", judge_weight=0.8)
    samples = {("a", 0): {"question": "q", "text": "plain", "score": 1.0},
               ("a", 1): {"question": "q", "text": "ですわ", "score": 0.5},
               ("a", 2): {"question": "q", "text": "failing", "score": 0.0}}
    from pipelines.training.pairs import JUDGED, judge_samples

    counts = judge_samples(None, None, "ayane", settings, "key", samples, tmp_path)
    assert counts == {"ok": 2, "failed": 1} and seen == {"criteria": ["personality"],
                                                         "closed": True}
    assert abs(samples[("a", 1)]["combined"] - 0.9) < 1e-9
    assert abs(samples[("a", 0)]["combined"] - 0.2) < 1e-9
    assert samples[("a", 2)]["combined"] == 0.0  # style alone
    prompts = [{"id": "a", "question": "q", "prompt": [{"role": "user", "content": "q"}]}]
    pairs, _ = make_pairs(prompts, samples, settings)
    assert pairs[0]["chosen"][0]["content"] == "ですわ"  # the judge outweighs style here
    assert pairs[0]["rejected"][0]["content"] == "failing"
    assert len(records(tmp_path / JUDGED)) == 3
