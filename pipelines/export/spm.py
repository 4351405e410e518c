"""A SentencePiece `tokenizer.model` rebuilt from a `tokenizer.json`, for models whose folder
has none (a model dequantised from a GGUF: transformers rebuilt its tokenizer from the GGUF
vocabulary as a BPE tokenizer.json).

Why: llama.cpp's Gemma 3 converter reads `tokenizer.model` when it is there; without it, it
takes the GPT-2 path, which identifies the pre-tokenizer by hashing a test string and
refuses any tokenizer it does not know (and a SentencePiece vocabulary is not a GPT-2 one).
The SentencePiece model written here carries the tokenizer's own vocabulary, ids and
special tokens, nothing guessed:

- pieces in id order; `<0xNN>` pieces are byte pieces, the unknown token is UNKNOWN, added
  special tokens are CONTROL, other added tokens USER_DEFINED;
- scores from the merge ranks: a piece made by merge rank r scores -r. llama.cpp's
  SentencePiece tokenizer merges the adjacent pair whose concatenation scores highest, which
  is then the pair with the lowest merge rank, as the BPE tokenizer does. (A tokenizer.json
  made from a SentencePiece model lists, for every piece, its merges next to each other, in
  the order of the original scores, so the order is the original one.)
- the normaliser as the tokenizer.json has it: spaces to U+2581, a leading U+2581 only if it
  prepends one.

The export's verification then checks, on the persona's sentences, that llama.cpp splits
text into exactly the ids the HF tokenizer does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
SPACE = "\u2581"


def _walk(node: Any) -> list[dict]:
    """A normaliser / pre-tokenizer and its Sequence members, flattened."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        inner = node.get("normalizers") or node.get("pretokenizers") or []
        return [n for item in inner for n in _walk(item)]
    return [node]


def sentencepiece_like(tok: dict) -> tuple[bool, bool]:
    """(whether the tokenizer.json is a SentencePiece-style BPE, whether it prepends U+2581)."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False, False
    steps = _walk(tok.get("normalizer")) + _walk(tok.get("pre_tokenizer"))
    spaces = prepend = False
    for step in steps:
        kind = step.get("type")
        if kind == "Replace" and step.get("content") == SPACE:
            spaces = True
        elif kind == "Prepend" and step.get("prepend") == SPACE:
            prepend = True
        elif kind == "Metaspace":
            spaces = True
            prepend = prepend or step.get("prepend_scheme", "always") != "never"
        elif kind == "ByteLevel":
            return False, False
    return spaces, prepend


def build_tokenizer_model(tokenizer_json: Path) -> bytes | None:
    """The serialized SentencePiece model for a SentencePiece-style tokenizer.json; None for
    any other tokenizer (the converter then handles it its own way)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    tok = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    ok, prepend = sentencepiece_like(tok)
    if not ok:
        return None
    model = tok["model"]
    vocab: dict[str, int] = model["vocab"]
    by_id: dict[int, str] = {i: piece for piece, i in vocab.items()}
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for i, t in added.items():
        by_id.setdefault(i, t["content"])
    size = max(by_id) + 1
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges") or []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, r)
    unk = model.get("unk_token")

    proto = spm_pb.ModelProto()
    P = spm_pb.ModelProto.SentencePiece
    seen: set[str] = set()
    for i in range(size):
        piece = by_id.get(i)
        if piece is None or piece in seen:  # a hole or a duplicate: keep the ids in place
            piece, kind = f"<kyara-unused-{i}>", P.UNUSED
        elif piece == unk:
            kind = P.UNKNOWN
        elif i in added:
            kind = P.CONTROL if added[i].get("special") else P.USER_DEFINED
        elif _BYTE.match(piece):
            kind = P.BYTE
        else:
            kind = P.NORMAL
        seen.add(piece)
        entry = proto.pieces.add()
        entry.piece = piece
        entry.type = kind
        entry.score = float(-rank[piece]) if kind == P.NORMAL and piece in rank else 0.0
    proto.trainer_spec.model_type = spm_pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = size
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.split_digits = False
    ids = {piece: i for i, piece in by_id.items()}
    config = _tokenizer_config(Path(tokenizer_json).parent)
    for field, key in (("unk_id", "unk_token"), ("bos_id", "bos_token"),
                       ("eos_id", "eos_token"), ("pad_id", "pad_token")):
        name = config.get(key)
        if isinstance(name, dict):
            name = name.get("content")
        setattr(proto.trainer_spec, field, ids.get(name, -1) if name else -1)
    if unk is not None and unk in ids:
        proto.trainer_spec.unk_id = ids[unk]
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = prepend
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
