"""What a judge is given (an Interaction) and what it returns (a Verdict).

A Verdict is the one result type of every path: an answer with a score (`ok`), an answer
without a valid final score (`invalid`, the raw text kept), and no answer at all (`failed`,
with an error kind). A failure is never a score of 0: callers that average scores must
look at `status`, and a `failed` verdict is asked again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["ok", "invalid", "failed"]

# Error kinds (Verdict.error_kind). Retryable within one run: the first five; the others
# need the user (a key, a model name, a prompt) or are the judge's own doing.
RATE_LIMITED = "rate_limited"      # 429
SERVER = "server_error"            # 5xx, an HTML error page
TIMEOUT = "timeout"                # no complete answer within timeout_s
CONNECTION = "connection"          # refused, reset, DNS
MALFORMED = "malformed"            # a 200 whose body is not a chat completion
EMPTY = "empty"                    # a completion with no text
BAD_REQUEST = "bad_request"        # 400 / 422
UNAUTHORIZED = "unauthorized"      # 401
FORBIDDEN = "forbidden"            # 403
NOT_FOUND = "not_found"            # 404
NO_SCORE = "no_score"              # status invalid: the text has no valid final score
LOCAL = "local_error"              # llama.cpp raised


class JudgeError(Exception):
    """A judge problem the user can fix (no key, unknown criterion). str() is one line."""


@dataclass(frozen=True)
class Interaction:
    """The turns under judgment: user/assistant messages, the last one the reply.

    `id` is the item's id (a dataset row, a calibration row, a chat message): an item is
    never shown as its own few-shot anchor, and it is the default message_id of the verdict.
    """

    messages: tuple[tuple[str, str], ...]
    id: str | None = None

    @classmethod
    def from_messages(cls, messages: Iterable[Mapping[str, Any]], id: str | None = None
                      ) -> Interaction:
        # System text is the model's instructions, not something the character said.
        turns = tuple((str(m["role"]), str(m["content"])) for m in messages
                      if m.get("role") in ("user", "assistant"))
        if not turns or turns[-1][0] != "assistant":
            raise JudgeError(f"item {id or '?'}: the interaction must end with an assistant reply")
        return cls(turns, id)

    @classmethod
    def from_pair(cls, question: str, reply: str, id: str | None = None) -> Interaction:
        return cls((("user", question), ("assistant", reply)), id)

    @property
    def reply(self) -> str:
        return self.messages[-1][1]

    @property
    def question(self) -> str:
        """The user turn the reply answers ('' when the reply opens the conversation)."""
        for role, content in reversed(self.messages[:-1]):
            if role == "user":
                return content
        return ""

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def digest(self) -> str:
        """A hash of the turns only (not the id): the same words are the same judgment."""
        blob = json.dumps(self.messages, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class Verdict:
    """One criterion's judgment of one interaction.

    For a `failed` verdict `error` is a one-line message for the user (no key in it); it
    is stored in the `reasoning` column, the only free-text column a failure has.
    """

    criterion: str
    status: Status
    score: int | None = None
    weighted_score: float | None = None
    reasoning: str | None = None
    raw_text: str | None = None
    error_kind: str | None = None
    error: str | None = None
    judge_model: str = ""
    prompt_version: str = ""
    tokens: int = 0
    latency_ms: float | None = None
    attempts: int = 0
    cache_key: str | None = None
    message_id: str | None = None
    cached: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.status == "ok" and self.score is None:
            raise ValueError("an ok verdict needs a score")
        if self.status != "ok" and self.score is not None:
            raise ValueError(f"a {self.status} verdict has no score")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_row(self, row_id: str) -> dict[str, Any]:
        """The judgments-table row (see store/schemas.py)."""
        return {
            "id": row_id,
            "message_id": self.message_id or "",
            "criterion": self.criterion,
            "judge_model": self.judge_model,
            "prompt_version": self.prompt_version,
            "status": self.status,
            "score": self.score,
            "weighted_score": self.weighted_score,
            "reasoning": self.error if self.status == "failed" else self.reasoning,
            "raw_text": self.raw_text,
            "error_kind": self.error_kind,
            "tokens": int(self.tokens or 0),
            "latency_ms": self.latency_ms,
            "attempts": int(self.attempts),
            "cache_key": self.cache_key,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any], *, cached: bool = True) -> Verdict:
        failed = row["status"] == "failed"
        return cls(
            criterion=row["criterion"],
            status=row["status"],
            score=row.get("score"),
            weighted_score=row.get("weighted_score"),
            reasoning=None if failed else row.get("reasoning"),
            raw_text=row.get("raw_text"),
            error_kind=row.get("error_kind"),
            error=row.get("reasoning") if failed else None,
            judge_model=row["judge_model"],
            prompt_version=row["prompt_version"],
            tokens=row.get("tokens") or 0,
            latency_ms=row.get("latency_ms"),
            attempts=row.get("attempts") or 0,
            cache_key=row.get("cache_key"),
            message_id=row.get("message_id") or None,
            cached=cached,
        )


def cache_key(*, persona: str, interaction: Interaction, criterion: str, judge_model: str,
              prompt_version: str, context: str) -> str:
    """(interaction, criterion, judge model, prompt version) -> the judgments.cache_key.

    `context` is a digest of what else shapes the prompt (template text, profile, speech
    rules, few-shot settings): editing a template without bumping prompt_version, or the
    profile, must not serve verdicts made from the old text.
    """
    parts = ["kyara-judge/1", persona, interaction.digest(), criterion, judge_model,
             prompt_version, context]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


OPENAI_URL = "https://api.openai.com/v1"


def judge_identity(config: Any) -> str:
    """Who answers and how (a JudgeConfig): provider, the server really reached (OpenAI's
    own reads OPENAI_BASE_URL when no base_url is set, as its client does), model and every
    sampling setting. In each cache key and each calibration: pointing a judge at another
    server, or changing how it samples, asks again and makes its calibration stale."""
    base = config.base_url
    if config.provider == "openai" and base is None:
        base = os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
    return digest_text(config.provider, base or "", config.model, config.temperature,
                       config.seed, config.max_tokens, config.logprobs)


def digest_text(*parts: str | int | Sequence[str]) -> str:
    blob = json.dumps(parts, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
