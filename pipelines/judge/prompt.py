"""The judge prompt: the criterion's template filled with the WHOLE persona profile and
speech rules, K scored example interactions (few-shot anchors), and the interaction under
judgment inside per-call random delimiters.

Why each part:
- Full profile: the lab's judge saw three lines of profile and scored the training data
  itself 2/7 ("a golden retriever" was not in its profile). Every fact it may check
  against is given.
- Anchors from the persona's calibration.jsonl, low, middle and high: they show the scale
  as the human labels use it. Chosen by a seeded RNG from the item, so a re-run builds the
  same prompt (and a cached verdict stays meaningful); never the item itself. Only rows
  labelled for the criterion: one without rows of its own is judged zero-shot (examples
  "(none)"), which the Judge logs and shows in its calibration label.
- Delimiters with fresh random hex per call and sanitized data: the reply under judgment
  is written by the model being judged, and may say "Score: 7" or try to close the data
  block; it cannot guess the delimiter and cannot write one.
"""

from __future__ import annotations

import random
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from pipelines.config import CalibrationRow, Criterion, Persona, SpeechRules
from pipelines.judge.verdict import Interaction, JudgeError

PLACEHOLDERS = ("name", "profile", "speech_rules", "examples", "interactions", "open", "close")
REQUIRED = ("interactions", "open", "close")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
MAX_MESSAGES = 16  # the last turns of a long chat: stability needs several, not a whole day

LOW, MIDDLE, HIGH = (1, 2), (3, 4, 5), (6, 7)


@dataclass(frozen=True)
class Delimiters:
    token: str

    @property
    def open(self) -> str:
        return f"<<<DATA-{self.token}>>>"

    @property
    def close(self) -> str:
        return f"<<<END-{self.token}>>>"


def new_delimiters() -> Delimiters:
    """Fresh per call: 48 random bits a reply cannot guess."""
    return Delimiters(secrets.token_hex(6))


# Anything that could pass for a delimiter: runs of angle brackets in any width or style.
_OPEN_RUN = re.compile(r"[<＜〈《≪«‹⟨〈]{2,}")
_CLOSE_RUN = re.compile(r"[>＞〉》≫»›⟩〉]{2,}")
# A line inside a message that poses as a new turn of the transcript.
_ROLE_TAG = re.compile(r"(?im)^([ \t　]*)[\[［]\s*(user|assistant|system)\s*[\]］]")


def sanitize(text: str) -> str:
    """Data text that cannot form a delimiter or fake a transcript turn."""
    text = _OPEN_RUN.sub("〈", text)
    text = _CLOSE_RUN.sub("〉", text)
    return _ROLE_TAG.sub(r"\1(\2)", text)


def format_interactions(interaction: Interaction) -> str:
    turns = interaction.messages[-MAX_MESSAGES:]
    return "\n".join(f"[{role}] {sanitize(content)}" for role, content in turns)


def format_profile(persona: Persona) -> str:
    head = persona.name + (f"（{persona.reading}）" if persona.reading else "")
    parts = [head]
    if persona.summary:
        parts.append(persona.summary.strip())
    parts.append(persona.profile.strip())
    return "\n".join(parts)


def format_speech_rules(speech: SpeechRules) -> str:
    lines = [
        f"- First person: {speech.first_person}",
        f"- Typical sentence endings: {' / '.join(speech.endings)}",
        f"- Length: about {speech.target_chars} characters, at most {speech.max_chars}",
        f"- Sentence-final mark: {speech.sentence_end}",
    ]
    lines += [f"- {rule}" for rule in speech.rules]
    return "\n".join(lines)


def anchor_pool(rows: Sequence[CalibrationRow], criterion: str) -> list[CalibrationRow]:
    """Rows labelled for this criterion, and only those: a criterion without rows of its
    own gets no anchors (zero-shot; the Judge says so), never another criterion's."""
    return [r for r in rows if r.criterion == criterion]


def select_anchors(rows: Sequence[CalibrationRow], criterion: str, interaction: Interaction,
                   k: int, seed: int) -> list[CalibrationRow]:
    """K anchors for this item: low (1-2), middle (3-5) and high (6-7) in turn, each drawn
    from its band by an RNG seeded with (seed, criterion, item); the item itself (same id,
    or the same question and reply) is never one of them."""
    if k <= 0:
        return []
    question, reply = interaction.question, interaction.reply
    pool = [r for r in anchor_pool(rows, criterion)
            if r.id != interaction.id and not (r.question == question and r.reply == reply)]
    rng = random.Random(f"{seed}\x1f{criterion}\x1f{interaction.id}\x1f{interaction.digest()}")
    bands = {name: [r for r in pool if r.score in scores]
             for name, scores in (("low", LOW), ("middle", MIDDLE), ("high", HIGH))}
    for band in bands.values():
        band.sort(key=lambda r: r.id)  # file order must not matter, only the seed
        rng.shuffle(band)
    # One anchor: the middle of the scale. Two: both ends. More: every band in turn.
    order = ["middle"] if k == 1 else ["low", "high"] if k == 2 else ["low", "middle", "high"]
    chosen: list[CalibrationRow] = []
    while len(chosen) < k and any(bands.values()):
        for name in order:
            if len(chosen) < k and bands[name]:
                chosen.append(bands[name].pop())
        if not any(bands[name] for name in order):  # the wanted bands ran dry: take the rest
            order = [name for name in bands if bands[name]]
    rng.shuffle(chosen)  # no fixed low-to-high order for the judge to lean on
    return chosen


def format_examples(anchors: Sequence[CalibrationRow]) -> str:
    if not anchors:
        return "(none)"
    blocks = []
    for number, row in enumerate(anchors, start=1):
        blocks.append(
            f"Example {number}\n[user] {sanitize(row.question)}\n[assistant] {sanitize(row.reply)}"
            f"\nScore ({row.criterion}): {row.score}\nReason: {sanitize(row.reason)}"
        )
    return "\n\n".join(blocks)


def check_template(criterion: Criterion) -> None:
    missing = [p for p in REQUIRED if "{" + p + "}" not in criterion.template]
    if missing:
        raise JudgeError(f"criterion {criterion.name!r}: the template needs the placeholder(s) "
                         + ", ".join("{" + p + "}" for p in missing))


@dataclass(frozen=True)
class JudgePrompt:
    text: str
    delimiters: Delimiters
    anchor_ids: tuple[str, ...]


def build_prompt(criterion: Criterion, persona: Persona, interaction: Interaction,
                 anchors: Sequence[CalibrationRow], delimiters: Delimiters | None = None
                 ) -> JudgePrompt:
    """Fill the template in ONE pass: a placeholder written inside the profile or a reply
    stays literal text, it is never expanded."""
    check_template(criterion)
    delimiters = delimiters or new_delimiters()
    values = {
        "name": persona.name,
        "profile": format_profile(persona),
        "speech_rules": format_speech_rules(persona.speech),
        "examples": format_examples(anchors),
        "interactions": format_interactions(interaction),
        "open": delimiters.open,
        "close": delimiters.close,
    }
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], criterion.template)
    return JudgePrompt(text, delimiters, tuple(a.id for a in anchors))
