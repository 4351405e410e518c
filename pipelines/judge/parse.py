"""The judge's final score, and the probability-weighted score (G-Eval) where the
provider gave logprobs.

The final score is the LAST line that is a score and nothing else: "7", "７", "7点",
"スコア: 7", "評価：7", "7/7", "**7**", "Score: **7**" (lines are NFKC-normalised one
character at a time, so full-width forms read as ASCII and positions map back to the raw
text). If that last score-like line holds a number outside 1-7 ("8", "0", "6.5", "10/10")
the answer is invalid: an earlier number is not quietly taken instead. Only the last
non-empty line may also state the score inside a sentence (「評価は「2」とします。」,
「7点が適当だと考えます。」), which is how judges that ignore the format end.

A reply under judgment can contain "Score: 7"; the judge's reasoning may quote it on its
own line, but the judge is asked to end with its own score, and the last one wins.

The weighted score is read where the judge decided: at the first of the trailing score
lines, not at the repeat the prompt asks for (a model copies its own digit there with
p ~ 1, which made the weighted score an integer in practice).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

_LABEL = (r"(?:final\s*score|score|rating|grade|最終スコア|スコア|最終評価|総合評価|評価点|評価"
          r"|点数|得点|採点結果|採点|判定)")
_OPENERS = r"[\s#>*_`「『【\[(\"'|]*(?:[-•・]\s+[\s*_`「『【\[(\"']*)?"
_AFTER_LABEL = r"[\s:=*_`「『【\[(\"'」』】\])]*"
_CLOSERS = r"[\s*_`」』】\])\"'|。.!]*"
_NUMBER = r"(?P<n>[-+−]?[0-9]+(?:[.,][0-9]+)?)"
_SUFFIX = r"(?:\s*(?:点|points?|pts?\.?|/\s*(?P<d>[0-9]+)))?"

_STANDALONE = re.compile(
    rf"^{_OPENERS}(?:{_LABEL}{_AFTER_LABEL})?{_NUMBER}{_SUFFIX}{_CLOSERS}$",
    re.IGNORECASE,
)
_IN_SENTENCE = (
    re.compile(
        rf"{_LABEL}\s*(?:は|を|:|=)?\s*[「『\"'*【\[(]*\s*{_NUMBER}\s*[」』\"'*】\])]*\s*(?:点)?"
        r"\s*(?:と(?:します|する|なります|いたします|判断|評価)|です|である|が(?:適当|妥当|適切)|[。.]|$)",
        re.IGNORECASE,
    ),
    re.compile(rf"(?<![0-9.]){_NUMBER}\s*点(?:が(?:適当|妥当|適切)|とします|とする|です|と評価)"),
)
SCORES = range(1, 8)


@dataclass(frozen=True)
class ParsedScore:
    score: int
    offset: int          # index in the raw text of the score digit
    line: int            # index of its line (str.splitlines)
    form: str            # "line" or "sentence"


def _normalise(line: str) -> tuple[str, list[int]]:
    """NFKC one character at a time, with the raw index of every normalised character."""
    out: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(line):
        piece = unicodedata.normalize("NFKC", char)
        out.append(piece)
        origin.extend([index] * len(piece))
    return "".join(out), origin


def _as_score(number: str) -> int | None:
    return int(number) if len(number) == 1 and number in "1234567" else None


def _lines(text: str) -> tuple[list[str], list[int]]:
    """The lines (str.splitlines, ends kept) and the offset in text where each starts."""
    lines = text.splitlines(keepends=True)
    starts: list[int] = []
    position = 0
    for line in lines:
        starts.append(position)
        position += len(line)
    return lines, starts


def _bare(line: str) -> str:
    return line.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def _score_line(raw: str) -> tuple[re.Match[str], int, list[int]] | None:
    """A line that is a score and nothing else: the match, its lead, the raw positions."""
    norm, origin = _normalise(raw)
    match = _STANDALONE.match(norm.strip())
    return (match, len(norm) - len(norm.lstrip()), origin) if match else None


def parse_score(text: str | None) -> ParsedScore | None:
    """The final score, or None when the answer has no valid final score. Never raises."""
    if not text:
        return None
    lines, starts = _lines(text)
    last_nonempty = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].strip()), None)
    for index in range(len(lines) - 1, -1, -1):
        raw = _bare(lines[index])
        if not raw.strip():
            continue
        line = _score_line(raw)
        if line:
            match, lead, origin = line
            return _found(match, lead, origin, starts[index], index, "line")
        if index == last_nonempty:
            norm, origin = _normalise(raw)
            for pattern in _IN_SENTENCE:
                found = list(pattern.finditer(norm))
                if found:
                    return _found(found[-1], 0, origin, starts[index], index, "sentence")
    return None


def _found(match: re.Match[str], lead: int, origin: list[int], line_start: int, line: int,
           form: str) -> ParsedScore | None:
    score = _as_score(match.group("n"))
    scale = match.groupdict().get("d")
    if score is None or (scale is not None and scale != "7"):  # "5/10" is another scale
        return None
    return ParsedScore(score, line_start + origin[lead + match.start("n")], line, form)


def decision_offset(text: str, parsed: ParsedScore) -> int:
    """Where the judge decided its score: the first of the trailing score lines (the prompt
    asks for the score, then the score again by itself). At the repeat a model copies its
    own digit with p ~ 1, so only the first line's probabilities say what it believed.
    Walks up from the parsed (last) line over blank lines and score lines that state the
    same score; a line with another number ends the walk (the judge changed its mind: the
    weighting stays with the lines that agree with the score kept). A score read inside a
    sentence has no repeat: its own offset."""
    if parsed.form != "line":
        return parsed.offset
    lines, starts = _lines(text)
    offset = parsed.offset
    for index in range(parsed.line - 1, -1, -1):
        raw = _bare(lines[index])
        if not raw.strip():
            continue
        line = _score_line(raw)
        if not line:
            break
        match, lead, origin = line
        found = _found(match, lead, origin, starts[index], index, "line")
        if found is None or found.score != parsed.score:
            break
        offset = found.offset
    return offset


def reasoning_of(text: str, parsed: ParsedScore) -> str:
    """The text before the final score (and before the score lines just above it: the
    prompt asks for the score, then the score again)."""
    lines = text.splitlines()
    if parsed.form == "sentence":
        return "\n".join(lines[: parsed.line + 1]).strip()
    end = parsed.line
    while end > 0:
        above = lines[end - 1].strip()
        if above and not _STANDALONE.match(_normalise(above)[0].strip()):
            break
        end -= 1
    return "\n".join(lines[:end]).strip()


# --- G-Eval ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its logprob, and the provider's top alternatives there."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    bytes: bytes | None = None


_DECORATION = " \t\r\n*_`:：「」『』【】[]()（）点#\"'"


def digit_of(token: str) -> int | None:
    """The score a token stands for: '7', ' 7', '７', '**7' -> 7; anything else None."""
    key = unicodedata.normalize("NFKC", token).strip(_DECORATION)
    return _as_score(key)


def score_distribution(token: TokenLogprob) -> dict[int, float]:
    """Probability of each score 1-7 among the alternatives at one position (unnormalised:
    the top-k list may hold other tokens too). Tokens that read as the same digit add up."""
    dist: dict[int, float] = {}
    seen: set[str] = set()
    for text, logprob in (*token.top, (token.token, token.logprob)):
        if text in seen:  # the chosen token is usually in its own top list
            continue
        seen.add(text)
        digit = digit_of(text)
        if digit is not None and logprob is not None and math.isfinite(logprob):
            dist[digit] = dist.get(digit, 0.0) + math.exp(logprob)
    return dist


def weighted_from_distribution(dist: dict[int, float]) -> float | None:
    total = sum(dist.values())
    if total <= 0:
        return None
    return sum(score * p for score, p in dist.items()) / total


def locate_token(text: str, offset: int, tokens: Sequence[TokenLogprob]) -> int | None:
    """The index of the token that carries text[offset], by byte position (tokens may split
    a multi-byte character, so characters cannot be counted)."""
    target = len(text[:offset].encode("utf-8"))
    position = 0
    for index, token in enumerate(tokens):
        size = len(token.bytes if token.bytes is not None else token.token.encode("utf-8"))
        if position <= target < position + size:
            return index
        position += size
    return None


def weighted_score(text: str, parsed: ParsedScore, tokens: Sequence[TokenLogprob] | None
                   ) -> float | None:
    """sum(p_i * i) / sum(p_i) over the tokens 1..7 where the judge decided its score: the
    first of the trailing score lines (`decision_offset`), not the repeat after it."""
    if not tokens:
        return None
    index = locate_token(text, decision_offset(text, parsed), tokens)
    if index is None or digit_of(tokens[index].token) != parsed.score:
        # The token stream does not line up with the text (a server that rewrote it):
        # fall back to the first token of the last run of tokens that are the parsed score
        # with nothing but decoration between them (the score line and its repeat).
        index = next((i for i in range(len(tokens) - 1, -1, -1)
                      if digit_of(tokens[i].token) == parsed.score), None)
        if index is None:
            return None
        earlier = index - 1
        while earlier >= 0 and (digit_of(tokens[earlier].token) == parsed.score
                                or not tokens[earlier].token.strip(_DECORATION)):
            if digit_of(tokens[earlier].token) == parsed.score:
                index = earlier
            earlier -= 1
    return weighted_from_distribution(score_distribution(tokens[index]))
