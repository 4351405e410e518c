"""The eval job's statistics: from its reply and verdict records (replies.jsonl,
verdicts.jsonl) to the results.json object the report and the console read.

    build_results(meta, combos, criteria, replies, verdicts) -> dict
    write_results(results, folder) -> Path      <folder>/results.json, atomically
    load_results(path_or_folder) -> dict        ValueError (one line) when missing or broken

Rules that keep the numbers honest:

- A failed or invalid verdict, and any verdict on a broken reply (`error` set), is missing,
  never a score; `missing` counts the questions left without one.
- Means are over questions: a question's value is the mean of its samples' ok scores, so a
  question asked three times weighs as much as one asked once. Style and fact rates count
  replies (every sample is a reply the user could get).
- A combination is compared with the reference over the questions both have a value for
  (paired), so a question one side failed on moves neither side.
- A rerun resumes and may append a record again: the last row per key wins, an ok verdict
  over a failed one and a whole reply over a broken one.

Pure over plain Python data (numbers through `pipelines.evaluation.stats`, scipy): no torch,
no models.
"""

from __future__ import annotations

import json
import os
import statistics
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.evaluation.stats import (
    mean_ci,
    outcome_rates,
    paired_diff,
    rates_dict,
    wilson,
)
from pipelines.files import write_json
from pipelines.home import EvalFiles

RESULTS_FILE = EvalFiles.RESULTS
SET_ORDER = ("heldout", "probes", "scripts", "simulated")
# Sets whose items are conversations: a per-turn question id "s01#3" belongs to script "s01".
CONVERSATION_SETS = ("scripts", "simulated")
STYLE_KEYS = ("ends", "register", "one_sentence", "stop", "newlines")
SCALE = tuple(str(s) for s in range(1, 8))
# The lab's first question, pinned to the top of the per-question table: the one everybody
# asks first and compares by eye (matched after NFKC, so ？ and ? are the same).
LAB_QUESTION = "あなたの名前はなんですか?"

Key = tuple[str, str]  # (set, question id): one question


def build_results(meta: Mapping[str, Any], combos: list[Mapping[str, Any]],
                  criteria: list[Mapping[str, Any]], replies: Iterable[Mapping[str, Any]],
                  verdicts: Iterable[Mapping[str, Any]], confidence: float = 0.95,
                  n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The results.json object (see the eval run contract) from the job's records, in three
    steps: the records that count (`_select`), their indices (`_tally`), then the headline
    rows and the per-question table."""
    picked = _select(meta.get("reference"), combos, replies, verdicts)
    names = _criterion_names(criteria, picked.asked_scores, picked.asked_pairs)
    t = _tally(picked, combos, names)
    stats = (confidence, n_resamples, seed)
    shown_order = [q for q in t.order if any((c["id"], q) in t.by_question for c in combos)]
    return {
        "meta": {**meta, "confidence": confidence},
        "combos": [dict(c) for c in combos],
        "criteria": [dict(c) for c in criteria],
        "sets": _sets(picked.records),
        "headline": [_headline_row(t, c, picked, names, stats) for c in combos],
        "distributions": t.distributions,
        "questions": [_question_row(t, q, combos, picked.reference, names)
                      for q in _lab_first(shown_order, picked.records)],
    }


@dataclass
class _Picked:
    """The records that count: the latest reply per sample and the latest verdict per
    sample and criterion, of known combinations; `scores` and `pairs` leave out the verdicts
    on broken replies (the `asked_` lists keep them: a criterion was still asked)."""

    reference: str | None
    records: list[Mapping[str, Any]]
    asked_scores: list[Mapping[str, Any]]
    asked_pairs: list[Mapping[str, Any]]
    scores: list[Mapping[str, Any]]
    pairs: list[Mapping[str, Any]]


def _select(reference: str | None, combos: list[Mapping[str, Any]],
            replies: Iterable[Mapping[str, Any]],
            verdicts: Iterable[Mapping[str, Any]]) -> _Picked:
    known = {c["id"] for c in combos}
    records = [r for r in _latest_replies(replies) if r.get("combo") in known]
    broken_ids = {r.get("id") for r in records if r.get("error") and r.get("id") is not None}
    broken_at = {_sample_key(r) for r in records if r.get("error")}

    def on_broken(v: Mapping[str, Any]) -> bool:
        return v.get("reply_id") in broken_ids or _sample_key(v) in broken_at

    verdicts = list(verdicts)
    asked_scores = [v for v in _latest_verdicts(verdicts, "score") if v["combo"] in known]
    asked_pairs = [v for v in _latest_verdicts(verdicts, "pairwise")
                   if v["combo"] in known and v["combo"] != reference
                   and v.get("reference", reference) == reference]
    scores = [v for v in asked_scores if not on_broken(v)]
    pairs = [v for v in asked_pairs if not on_broken(v)
             and _sample_key({**v, "combo": reference}) not in broken_at]
    return _Picked(reference, records, asked_scores, asked_pairs, scores, pairs)


@dataclass
class _Tally:
    """The picked records indexed by combination, question, sample and criterion."""

    # criterion -> the sets it is asked on (the job asks probes and scripts on criteria of
    # their own): a question of such a set without an ok score is missing for it
    scored_sets: dict[str, set[str]]
    paired_sets: dict[str, set[str]]
    order: list[Key]                                          # every question, first seen
    by_question: dict[tuple[str, Key], list[Mapping[str, Any]]]  # (combo, question) -> replies
    asked: dict[str, set[Key]]          # combo -> every question with a reply
    answered: dict[str, set[Key]]       # combo -> with a whole reply
    judged: dict[tuple[str, str], set[Key]]  # (combo, criterion) -> questions with a verdict
    values: dict[tuple[str, str], dict[Key, float]]  # (combo, criterion) -> question -> mean
    per_sample: dict[tuple[str, Key, int, str], float]
    distributions: dict[str, dict[str, dict[str, int]]]
    outcomes: dict[tuple[str, str], list[str | None]]
    compared: set[tuple[str, str]]      # (combo, criterion) asked pairwise
    per_sample_outcome: dict[tuple[str, Key, int, str], str | None]


def _tally(picked: _Picked, combos: list[Mapping[str, Any]], names: list[str]) -> _Tally:
    scored_sets: dict[str, set[str]] = defaultdict(set)
    for v in picked.asked_scores:
        scored_sets[v["criterion"]].add(v.get("set", ""))
    paired_sets: dict[str, set[str]] = defaultdict(set)
    for v in picked.asked_pairs:
        paired_sets[v["criterion"]].add(v.get("set", ""))

    by_question: dict[tuple[str, Key], list[Mapping[str, Any]]] = defaultdict(list)
    for r in picked.records:
        by_question[r["combo"], _key(r)].append(r)
    asked: dict[str, set[Key]] = defaultdict(set)
    answered: dict[str, set[Key]] = defaultdict(set)
    for (cid, q), rs in by_question.items():
        asked[cid].add(q)
        if any(not r.get("error") for r in rs):
            answered[cid].add(q)
    judged: dict[tuple[str, str], set[Key]] = defaultdict(set)
    for v in picked.scores:
        judged[v["combo"], v["criterion"]].add(_key(v))

    # (combo, criterion) -> question -> its samples' ok scores
    per_question: dict[tuple[str, str], dict[Key, list[float]]] = defaultdict(
        lambda: defaultdict(list))
    per_sample: dict[tuple[str, Key, int, str], float] = {}
    distributions: dict[str, dict[str, dict[str, int]]] = {
        c["id"]: {name: dict.fromkeys(SCALE, 0) for name in names} for c in combos}
    for v in picked.scores:
        if not _ok(v):
            continue
        combo, name, score = v["combo"], v["criterion"], v["score"]
        per_question[combo, name][_key(v)].append(float(score))
        per_sample[combo, _key(v), _sample(v), name] = score
        counts = distributions[combo][name]
        label = str(int(score)) if float(score).is_integer() else str(score)
        counts[label] = counts.get(label, 0) + 1
    values = {combo_name: {q: statistics.fmean(s) for q, s in qs.items()}
              for combo_name, qs in per_question.items()}

    outcomes: dict[tuple[str, str], list[str | None]] = defaultdict(list)
    per_sample_outcome: dict[tuple[str, Key, int, str], str | None] = {}
    for v in picked.pairs:
        outcomes[v["combo"], v["criterion"]].append(v.get("outcome"))
        per_sample_outcome[v["combo"], _key(v), _sample(v), v["criterion"]] = v.get("outcome")
    return _Tally(scored_sets=scored_sets, paired_sets=paired_sets,
                  order=_question_order(picked.records, picked.scores),
                  by_question=by_question, asked=asked, answered=answered, judged=judged,
                  values=values, per_sample=per_sample, distributions=distributions,
                  outcomes=outcomes,
                  compared={(v["combo"], v["criterion"]) for v in picked.asked_pairs},
                  per_sample_outcome=per_sample_outcome)


def _headline_row(t: _Tally, combo: Mapping[str, Any], picked: _Picked, names: list[str],
                  stats: tuple[float, int, int]) -> dict[str, Any]:
    """One combination's headline: each criterion's mean [CI] and paired difference to the
    reference, pairwise rates, style and fact proportions."""
    confidence, n_resamples, seed = stats
    cid, reference = combo["id"], picked.reference
    is_reference = cid == reference
    crits: dict[str, Any] = {}
    for name in names:
        mine = t.values.get((cid, name), {})
        expected = {q for q in t.asked[cid] if q[0] in t.scored_sets[name]} | t.judged[cid, name]
        est = mean_ci([mine[q] for q in t.order if q in mine], confidence, n_resamples, seed)
        diff = None
        if not is_reference and reference is not None:
            ref = t.values.get((reference, name), {})
            both = [q for q in t.order if q in mine and q in ref]
            diff = paired_diff([mine[q] for q in both], [ref[q] for q in both],
                               confidence, n_resamples, seed).to_dict()
        crits[name] = {"mean": est.mean, "lo": est.lo, "hi": est.hi, "n": est.n,
                       "missing": len(expected) - est.n, "diff": diff}
    pairwise: dict[str, Any] = {}
    if not is_reference:
        pairwise = {name: rates_dict(outcome_rates(t.outcomes[cid, name], confidence))
                    for name in names if (cid, name) in t.compared}
    whole = [r for r in picked.records if r["combo"] == cid and not r.get("error")]
    return {"combo": cid, "label": combo.get("label", cid), "reference": is_reference,
            "questions": len(t.answered[cid]),
            "criteria": crits, "pairwise": pairwise,
            "style": _style(whole, confidence),
            "facts": _proportion([r.get("fact_hit") for r in whole], confidence)}


def _question_row(t: _Tally, q: Key, combos: list[Mapping[str, Any]], reference: str | None,
                  names: list[str]) -> dict[str, Any]:
    """One row of the per-question table: every combination's shown reply with its scores
    and pairwise outcomes, and the spread of the combinations' means."""
    shown: dict[str, Any] = {}
    first: Mapping[str, Any] | None = None
    means: list[float] = []
    for combo in combos:
        cid = combo["id"]
        mine = t.by_question.get((cid, q))
        if not mine:
            continue
        # The reply shown: the first sample, and of a script its whole-script record.
        rep = min(mine, key=lambda r: ("#" in str(r.get("question_id", "")), _sample(r)))
        first = first or rep
        sample = _sample(rep)
        whole = not rep.get("error")
        shown[cid] = {
            "text": rep.get("text", ""), "stop": rep.get("stop"), "error": rep.get("error"),
            "scores": {name: t.per_sample.get((cid, q, sample, name)) if whole else None
                       for name in names if q[0] in t.scored_sets[name]},
            "pairwise": {} if cid == reference else {
                name: t.per_sample_outcome.get((cid, q, sample, name)) if whole else None
                for name in names if q[0] in t.paired_sets[name]},
            "fact_hit": rep.get("fact_hit") if whole else None}
        scored = [t.values[cid, name][q] for name in names
                  if q in t.values.get((cid, name), {})]
        if scored:
            means.append(statistics.fmean(scored))
    assert first is not None  # every question in `order` has a reply
    transcript = None
    if q[0] in CONVERSATION_SETS:
        transcript = [{"role": "user", "content": m.get("content", "")}
                      for m in first.get("transcript") or [] if m.get("role") == "user"]
    return {"set": q[0], "id": q[1], "question": first.get("question", ""),
            "transcript": transcript, "replies": shown,
            "disagreement": max(means) - min(means) if len(means) >= 2 else 0.0}


def write_results(results: Mapping[str, Any], folder: str | os.PathLike[str]) -> Path:
    """<folder>/results.json (UTF-8, Japanese as it is), written to a temporary file and
    moved into place, so a reader never sees half of it."""
    return write_json(Path(folder) / RESULTS_FILE, results, allow_nan=False)


def load_results(path_or_folder: str | os.PathLike[str]) -> dict[str, Any]:
    """results.json from its path or its run folder; a ValueError of one line when it is
    missing, unreadable or not a results object."""
    path = Path(path_or_folder)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no results yet (the eval job writes them when it "
                         "finishes)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({_one_line(exc)})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno}); rerun the eval job to rebuild it") from None
    needed = ("meta", "combos", "criteria", "headline", "questions")
    if not isinstance(data, dict) or any(k not in data for k in needed):
        raise ValueError(f"{path}: not an eval results file (expected an object with "
                         f"{', '.join(needed)})")
    return data


# -- records ------------------------------------------------------------------------------

def _key(record: Mapping[str, Any]) -> Key:
    """The question a reply or verdict belongs to; a script's turn belongs to its script."""
    kind = str(record.get("set", ""))
    qid = str(record.get("question_id", ""))
    if kind in CONVERSATION_SETS:
        qid = qid.split("#", 1)[0]
    return kind, qid


def _sample(record: Mapping[str, Any]) -> int:
    return int(record.get("sample") or 0)


def _sample_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """One reply: (combo, set, question id, sample)."""
    return record.get("combo"), record.get("set"), record.get("question_id"), _sample(record)


def _ok(verdict: Mapping[str, Any]) -> bool:
    score = verdict.get("score")
    return (verdict.get("status") == "ok" and isinstance(score, (int, float))
            and not isinstance(score, bool))


def _latest_replies(replies: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per (combo, set, question, sample), in first-seen order: the last whole
    one, else the last broken one."""
    kept: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for r in replies:
        key = _sample_key(r)
        old = kept.get(key)
        if old is None or not r.get("error") or old.get("error"):
            kept[key] = r
    return list(kept.values())


def _latest_verdicts(verdicts: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    """One verdict of `kind` per (combo, set, question, sample, criterion): the last usable
    one (ok score, or a pairwise outcome), else the last one."""
    kept: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for v in verdicts:
        if v.get("kind") != kind or v.get("criterion") is None or v.get("combo") is None:
            continue
        key = (*_sample_key(v), v["criterion"])
        old = kept.get(key)
        if old is None or _usable(v) or not _usable(old):
            kept[key] = v
    return list(kept.values())


def _usable(verdict: Mapping[str, Any]) -> bool:
    return _ok(verdict) if verdict.get("kind") == "score" else verdict.get("outcome") is not None


def _criterion_names(criteria: list[Mapping[str, Any]], *verdicts: list[Mapping[str, Any]]
                     ) -> list[str]:
    """The criteria as given, then any a verdict names that the list lacks."""
    names = [str(c["name"]) for c in criteria]
    for group in verdicts:
        names += [v["criterion"] for v in group]
    return list(dict.fromkeys(names))


def _question_order(records: list[Mapping[str, Any]],
                    scores: list[Mapping[str, Any]]) -> list[Key]:
    """Every question, in the order first seen (replies, then verdicts)."""
    return list(dict.fromkeys([_key(r) for r in records] + [_key(v) for v in scores]))


def _lab_first(order: list[Key], records: list[Mapping[str, Any]]) -> list[Key]:
    """The lab question(s) first, the rest in their order."""
    text: dict[Key, str] = {}
    for r in records:
        text.setdefault(_key(r), str(r.get("question", "")))
    lab = [q for q in order if unicodedata.normalize("NFKC", text.get(q, "")).strip()
           == LAB_QUESTION]
    return lab + [q for q in order if q not in lab]


def _sets(records: list[Mapping[str, Any]]) -> list[str]:
    present = list(dict.fromkeys(str(r.get("set", "")) for r in records))
    return [s for s in SET_ORDER if s in present] + [s for s in present if s not in SET_ORDER]


# -- rates --------------------------------------------------------------------------------

def _proportion(flags: Iterable[Any], confidence: float) -> dict[str, Any] | None:
    """Share of True among the booleans (None and anything else left out); None when
    there is no boolean."""
    seen = [f for f in flags if isinstance(f, bool)]
    rate = wilson(sum(seen), len(seen), confidence)
    return rate.to_dict() if rate is not None else None


def _style(records: list[Mapping[str, Any]], confidence: float) -> dict[str, Any]:
    """Each style check's pass share over the replies (`figures.style_figures`: the count
    the train job's figures make, name for name; `newlines` is the share without a line
    break), with its Wilson interval, and their median length. A record's `style` is one
    reply's `ReplyStyle.record()`, or a list of them (a script's every assistant turn)."""
    from pipelines.evaluation.figures import style_figures
    from pipelines.style import ReplyStyle

    styles: list[ReplyStyle] = []
    for r in records:
        style = r.get("style")
        if isinstance(style, Mapping):
            styles.append(ReplyStyle.from_record(style))
        elif isinstance(style, list):
            styles += [ReplyStyle.from_record(s) for s in style if isinstance(s, Mapping)]
    figs = style_figures("", styles)
    out: dict[str, Any] = {}
    for key in STYLE_KEYS:
        rate = wilson(*figs.counts[key], confidence) if key in figs.counts else None
        out[key] = rate.to_dict() if rate is not None else None
    measured = any(s.chars is not None for s in styles)
    out["median_chars"] = figs.median_chars if measured else None
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
