"""Japanese morphological analysis for the full-text side of retrieval (SudachiPy +
SudachiDict core, both from PyPI, offline).

Why Sudachi (bench/retrieval.py measured it against fugashi + unidic-lite): its dictionary
gives each word a *normalised form* (表記ゆれ folded: 観る/見る, 御茶/お茶, 苗字/名字) and
the ids of the *synonym groups* it belongs to (誕生日 and 生年月日 share one). The
synonym dictionary itself (SudachiDict's synonyms.txt, read by chikkarpy) is not on PyPI
as data: chikkarpy's build downloads it and fails offline. The group ids in the system
dictionary are enough: a fact and a question that use two words of one group share the
group's token, which is what expanding the question with the group's words would match.

`terms(text)` is what the word index holds for a fact (and what a question is searched
with): the normalised forms of its content words, in Sudachi's long units (mode C) and
their short parts (mode A: 演劇部 -> 演劇 + 部), plus one `syn<id>` token per synonym
group. `content_words(text)` is the same analysis without the groups, for the rule the
paraphrase set keeps (tests/test_retrieval_paraphrases.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator

ANALYSER = "sudachi-core-c+a-syn-1"  # part of every fact's content hash: bump to re-index
# The one compared against it in bench/retrieval.py (UniDic lemmas; no synonym groups).
FUGASHI = "fugashi-unidic-lite-1"

# Parts of speech whose words carry content: nouns (and pronoun-free numerals), verbs,
# adjectives, na-adjectives (形状詞), adverbs. Particles, auxiliaries, prefixes, suffixes,
# symbols and pronouns are left out.
CONTENT_POS = frozenset({"名詞", "動詞", "形容詞", "形状詞", "副詞"})
# Light verbs and formal nouns (normalised forms): in nearly every sentence, they say
# nothing about what a question asks ("何をしているの", "好きなこと").
LIGHT = frozenset({"為る", "する", "居る", "いる", "有る", "ある", "成る", "なる", "事", "こと",
                   "物", "もの"})

_local = threading.local()
_lock = threading.Lock()  # functools.cache may run the loader twice at once


@functools.cache
def _dictionary():
    from sudachipy import Dictionary

    return Dictionary(dict="core")


def _tokenizer():
    """One tokenizer per thread (a Sudachi tokenizer is not safe to share); one dictionary
    (~200 MB, memory-mapped) per process."""
    tok = getattr(_local, "tokenizer", None)
    if tok is None:
        with _lock:
            tok = _local.tokenizer = _dictionary().tokenizer(mode="C")
    return tok


def _content(morpheme) -> bool:
    pos = morpheme.part_of_speech()
    return (pos[0] in CONTENT_POS and morpheme.normalized_form() not in LIGHT
            and morpheme.dictionary_form() not in LIGHT)


def _units(text: str) -> Iterator:
    """Long units (mode C) and, where a long unit has parts, its short units (mode A)."""
    from sudachipy import SplitMode

    for m in _tokenizer().tokenize(text):
        yield m
        parts = m.split(SplitMode.A)
        if len(parts) > 1:
            yield from parts


def content_words(text: str) -> set[str]:
    """The normalised and dictionary forms of the content words of `text`."""
    out: set[str] = set()
    for m in _units(text):
        if _content(m):
            out.add(m.normalized_form())
            out.add(m.dictionary_form())
    return out


def sudachi_terms(text: str) -> list[str]:
    """Normalised forms of the content words (long and short units) and `syn<id>` per
    synonym group; whitespace-free, in text order."""
    out: list[str] = []
    for m in _units(text):
        if not _content(m):
            continue
        out.append(m.normalized_form().replace(" ", "_"))
        out.extend(f"syn{g}" for g in m.synonym_group_ids())
    return out


@functools.cache
def _fugashi():
    import fugashi  # with unidic-lite: bench/retrieval.py's comparison only

    return fugashi.Tagger()


def fugashi_terms(text: str) -> list[str]:
    """UniDic lemmas of the content words (short units; UniDic has no synonym groups)."""
    with _lock:  # one MeCab tagger, not safe to share between threads
        words = [(w.feature.pos1, w.feature.lemma or w.surface) for w in _fugashi()(text)]
    return [lemma.split("-")[0].replace(" ", "_") for pos, lemma in words
            if pos in CONTENT_POS and lemma.split("-")[0] not in LIGHT]


_ANALYSERS = {ANALYSER: sudachi_terms, FUGASHI: fugashi_terms}
_current = [ANALYSER]


def use(name: str) -> None:
    """Choose the analyser `terms` runs (bench/retrieval.py compares them); the name goes
    into every fact's content hash, so facts are re-analysed on the next index_persona."""
    if name not in _ANALYSERS:
        raise ValueError(f"unknown analyser {name!r} ({', '.join(_ANALYSERS)})")
    _current[0] = name


def current() -> str:
    return _current[0]


def terms(text: str, analyser: str | None = None) -> list[str]:
    """The word index's tokens for `text` (a fact with its asks, or a question), by
    `analyser` (default: the current one)."""
    return _ANALYSERS[analyser or _current[0]](text)
