"""A persona's files under configs/personas/<id>/: persona.yaml, knowledge.jsonl,
dialogues.jsonl, eval.jsonl, probes.jsonl, scripts.jsonl, scenarios.jsonl and
calibration.jsonl."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipelines.config.base import Strict, no_blank_items


class SpeechRules(Strict):
    """How the character speaks: shown to the judge, checked by the style checks."""

    first_person: str = Field(description="the character's word for I, e.g. わたくし")
    endings: list[str] = Field(min_length=1, description="typical sentence endings")
    target_chars: int = Field(30, gt=0, description="the usual length of a reply, characters")
    max_chars: int = Field(45, gt=0, description="the longest a reply should be, characters")
    sentence_end: str = Field("。", description="the mark a sentence ends with")
    rules: list[str] = Field(default_factory=list, description="further rules, one line each "
                             "in the judge's speech rules")


class PersonaPrompts(Strict):
    system: str = Field(min_length=1, description="the system prompt without retrieval")
    system_rag: str = Field(min_length=1, description="the system prompt with retrieval; "
                            "{context} is where the retrieved facts go")

    @field_validator("system_rag")
    @classmethod
    def _has_context(cls, value: str) -> str:
        if value.count("{context}") != 1:
            raise ValueError("system_rag must contain the placeholder {context} exactly once")
        return value


class Persona(Strict):
    """persona.yaml: who the character is and how the model is told so."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="the persona's folder name")
    name: str = Field(description="the character's name")
    reading: str | None = Field(None, description="how the name is read (kana)")
    summary: str = Field("", description="one or two sentences, shown before the profile")
    profile: str = Field(min_length=1, description="the whole character sheet the judge sees")
    speech: SpeechRules = Field(description="how the character speaks")
    prompts: PersonaPrompts = Field(description="the system prompts chat and training use")


class KnowledgeFact(Strict):
    """One line of knowledge.jsonl: a fact retrieval can find."""

    id: str = Field(min_length=1, description="a stable id, named by dialogues and questions")
    topic: str = Field(min_length=1, description="what the fact is about, e.g. 家族")
    text: str = Field(min_length=1, description="the fact, as the model is shown it")
    # Indexed with the fact so that a question worded unlike the fact still finds it
    # (retrieval's word index and vectors).
    asks: list[str] | None = Field(None, description="questions this fact answers, in a "
                                   "user's words; generated ones are added to them")

    _asks_not_blank = field_validator("asks")(lambda v: v if v is None else no_blank_items(v))


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"] = Field(description="who says it")
    content: str = Field(description="what is said")


class Dialogue(Strict):
    """One training conversation in OpenAI chat format (`messages`), plus a stable id."""

    id: str | None = Field(None, description="a stable id, if any")
    messages: list[ChatMessage] = Field(min_length=2, description="the turns, ending with "
                                        "the assistant's")
    # The train job puts them into its retrieval prompt when retrieval misses them
    # (training/rag_examples.py).
    knowledge_ids: list[str] = Field(default_factory=list, description="the facts "
                                     "(knowledge.jsonl ids) the last reply states")

    @field_validator("messages")
    @classmethod
    def _ends_with_assistant(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if value[-1].role != "assistant":
            raise ValueError("a conversation must end with an assistant message")
        return value


class EvalQuestion(Strict):
    """A held-out question. `expect`: any-of substrings, one of which a reply that states the
    fact contains (compare both after NFKC, without whitespace or "・"); empty where no short
    substring decides it and only the judge can."""

    id: str = Field(description="a stable id")
    question: str = Field(min_length=1, description="what the user asks")
    knowledge_ids: list[str] = Field(default_factory=list, description="the facts "
                                     "(knowledge.jsonl ids) that answer it")
    expect: list[str] = Field(default_factory=list, description="any-of substrings of a "
                              "reply that states the fact; empty: only the judge decides")

    _expect_not_blank = field_validator("expect")(no_blank_items)


ProbeKind = Literal["code", "future", "secret", "expertise", "break_character", "unknown_self",
                   "inappropriate"]
PROBE_KINDS: tuple[str, ...] = ProbeKind.__args__


class Probe(Strict):
    """An out-of-scope question (probes.jsonl): something the character cannot know or
    would not do; `expect` says, in one sentence, what a graceful in-character answer does."""

    id: str = Field(min_length=1, description="a stable id")
    question: str = Field(min_length=1, description="what the user asks")
    kind: ProbeKind = Field(description="what makes it out of scope")
    expect: str = Field(min_length=1, description="what a graceful in-character answer does")


class Script(Strict):
    """A multi-turn interview (scripts.jsonl): the user's turns only; the model answers each
    and the whole transcript is judged (stability, consistency)."""

    id: str = Field(min_length=1, description="a stable id")
    title: str = Field(min_length=1, description="what the interview is about")
    turns: list[str] = Field(min_length=4, max_length=6, description="the user's turns, "
                             "four to six")

    _turns_not_blank = field_validator("turns")(no_blank_items)


class Scenario(Strict):
    """Who a simulated asker is and what they want to find out (scenarios.jsonl), with the
    asker's first message."""

    id: str = Field(min_length=1, description="a stable id")
    scenario: str = Field(min_length=1, description="who the asker is and what they want "
                          "to find out, told to the simulator")
    opening: str = Field(min_length=1, description="the asker's first message")


class CalibrationRow(Strict):
    """One human label (calibration.jsonl): the judge's few-shot anchors and what its
    agreement is measured against."""

    id: str = Field(description="a stable id")
    criterion: str = Field("personality", description="the criterion the score is on")
    question: str = Field(description="what the user asked")
    reply: str = Field(description="the reply scored")
    score: int = Field(ge=1, le=7, description="the human's score, 1..7")
    reason: str = Field(description="why, in a sentence")
