"""Does a GGUF behave like the model it came from? Checked before an export is registered.

- tokeniser: the persona's Japanese sentences through the GGUF vocabulary (llama.cpp) and
  the HF tokenizer: the ids must be identical, sentence by sentence;
- generation: greedy, 32 new tokens, for eval questions, from the same folded prompt on
  both sides (the persona's system prompt folded as the engine folds it); the first index
  where the two token sequences differ is reported (f16/f32: identical for at least 4 of 5
  required; quantised files: reported only);
- end of turn: the template's end-of-turn token (`<end_of_turn>` for Gemma, else EOS) has
  the same id on both sides and llama.cpp treats it as end of generation, so the gguf
  backend stops on it.

`verify_gguf` returns a Verification; `.passed` and `.problems` say whether it may be
registered, `.lines()` is the human table, `.to_dict()` goes into verification.json and
`.summary()` into the run's `done` event (and the shipped adapter's provenance). Where the
generation check is waived, `generation` says so ("not required (quantised base)") and
the comparison is kept beside it as `greedy_identical`, reported only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.files import read_jsonl_lines
from pipelines.prompting import render_prompt

MAX_NEW_TOKENS = 32
N_SENTENCES = 20
N_QUESTIONS = 5
REQUIRED_IDENTICAL = 4  # of 5, for unquantised files


@dataclass
class GenerationRow:
    question: str
    hf_tokens: list[int]
    gguf_tokens: list[int]
    first_divergence: int | None  # None: identical
    hf_text: str = ""
    gguf_text: str = ""


@dataclass
class Verification:
    gguf: str
    kind: str  # f16, Q4_K_M, lora f16, ...
    require_generation: bool
    sentences: int = 0
    sentences_identical: int = 0
    tokenizer_mismatches: list[dict[str, Any]] = field(default_factory=list)
    end_of_turn: dict[str, Any] = field(default_factory=dict)
    generations: list[GenerationRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def identical_generations(self) -> int:
        return sum(1 for g in self.generations if g.first_divergence is None)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def greedy_identical(self) -> str:
        return f"{self.identical_generations}/{len(self.generations)} identical"

    @property
    def generation(self) -> str:
        """The generation check: 'k/n identical' where it is required, else why it is not
        (a quantised file, or a LoRA adapter on a quantised base: greedy paths part early)."""
        if self.require_generation:
            return self.greedy_identical
        waived = "quantised base" if self.kind.lower().startswith("lora") else "quantised file"
        return f"not required ({waived})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["identical_generations"] = self.identical_generations
        data["generation"] = self.generation
        data["passed"] = self.passed
        return data

    def summary(self) -> dict[str, Any]:
        """The short form for a `done` event."""
        return {
            "gguf": self.gguf,
            "kind": self.kind,
            "tokenizer": f"{self.sentences_identical}/{self.sentences} identical",
            "generation": self.generation,
            "greedy_identical": self.greedy_identical,
            "first_divergence": [g.first_divergence for g in self.generations],
            "end_of_turn": self.end_of_turn.get("ok", False),
            "passed": self.passed,
        }

    def lines(self) -> list[str]:
        out = [f"verification of {Path(self.gguf).name} ({self.kind})",
               f"  tokeniser: {self.sentences_identical}/{self.sentences} sentences give "
               "identical ids"]
        eot = self.end_of_turn
        out.append(f"  end of turn: {eot.get('token')!r} hf id {eot.get('hf_id')} gguf id "
                   f"{eot.get('gguf_id')}, ends generation in llama.cpp: "
                   f"{'yes' if eot.get('is_eog') else 'no'}")
        out.append(f"  greedy {MAX_NEW_TOKENS} tokens: {self.greedy_identical}"
                   + ("" if self.require_generation
                      else f" (generation check {self.generation}: reported only)"))
        out.append("    #  hf  gguf  first divergence  question")
        for i, g in enumerate(self.generations, 1):
            where = "-" if g.first_divergence is None else str(g.first_divergence)
            out.append(f"   {i:2d} {len(g.hf_tokens):3d} {len(g.gguf_tokens):5d}  {where:>16}  "
                       f"{g.question[:30]}")
        out += [f"  FAILED: {p}" for p in self.problems] or ["  passed"]
        return out


def persona_texts(persona_dir: Path, n_sentences: int = N_SENTENCES,
                  n_questions: int = N_QUESTIONS) -> tuple[list[str], list[str]]:
    """Japanese sentences from dialogues.jsonl (distinct, in file order) and the first eval
    questions from eval.jsonl."""
    sentences: list[str] = []
    for row in read_jsonl_lines(persona_dir / "dialogues.jsonl"):
        if not row.strip():
            continue
        for message in json.loads(row)["messages"]:
            text = message["content"].strip()
            if text and text not in sentences and any(ord(c) > 0x3000 for c in text):
                sentences.append(text)
    questions = [json.loads(row)["question"] for row in
                 read_jsonl_lines(persona_dir / "eval.jsonl")
                 if row.strip()]
    return sentences[:n_sentences], questions[:n_questions]


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def load_hf(hf_dir: Path, adapter: Path | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) in fp32, the PEFT adapter applied unmerged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return tokenizer, model


def generation_required(kind: str) -> bool:
    """The one rule for the greedy-generation check: required (4 of 5 identical) only where
    the GGUF's weights are unquantised, f16 or f32 — the export kind, or a file name that
    names it (`gemma-3-270m-f16.gguf`, `lora + f16 base`). Quantised weights (q8_0, q4_k_m)
    and bf16 change greedy replies legitimately: for them it is reported, not required."""
    words = re.split(r"[^0-9a-z]+", kind.lower())
    return "f16" in words or "f32" in words


def _hf_eog_ids(tokenizer: Any, model: Any) -> set[int]:
    from pipelines.evaluation import end_of_generation_ids

    return set(end_of_generation_ids(model, tokenizer))


def verify_gguf(gguf: Path, hf_dir: Path, *, sentences: Sequence[str],
                questions: Sequence[str], system: str | None = None,
                chat_template: str | None = None, adapter: Path | None = None,
                lora_path: Path | None = None, kind: str = "f16",
                require_generation: bool = True,
                max_new_tokens: int = MAX_NEW_TOKENS, n_threads: int | None = None,
                hf_model: tuple[Any, Any] | None = None) -> Verification:
    """Compare `gguf` (with the GGUF adapter `lora_path`, if any) against the HF model in
    `hf_dir` (with the PEFT `adapter`, if any). `hf_model` = (tokenizer, model) already
    loaded by `load_hf` (several files checked against one model load it once)."""
    import llama_cpp
    import torch

    from pipelines.export.convert import chat_template_for
    from pipelines.inference.llama_logs import route_llama_logs

    route_llama_logs(llama_cpp)
    result = Verification(gguf=str(gguf), kind=kind, require_generation=require_generation)
    tokenizer, model = hf_model or load_hf(Path(hf_dir), adapter)
    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora_path) if lora_path else None,
                          n_ctx=1024, n_threads=n_threads, verbose=False)
    try:
        # 1. the tokeniser
        for text in sentences:
            hf_ids = tokenizer.encode(text, add_special_tokens=False)
            gguf_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            result.sentences += 1
            if list(hf_ids) == list(gguf_ids):
                result.sentences_identical += 1
            else:
                result.tokenizer_mismatches.append({"text": text, "hf": hf_ids[:40],
                                                    "gguf": gguf_ids[:40]})
        if result.sentences_identical < result.sentences:
            result.problems.append(f"the GGUF vocabulary splits "
                                   f"{result.sentences - result.sentences_identical} of "
                                   f"{result.sentences} sentences differently from the HF "
                                   "tokenizer")

        # 2. the end-of-turn token
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        hf_eog = _hf_eog_ids(tokenizer, model)
        token = "<end_of_turn>" if "<end_of_turn>" in tokenizer.get_vocab() else tokenizer.eos_token
        hf_id = tokenizer.convert_tokens_to_ids(token)
        found = llm.tokenize(token.encode("utf-8"), add_bos=False, special=True)
        gguf_id = found[0] if len(found) == 1 else None
        is_eog = gguf_id is not None and bool(llama_cpp.llama_vocab_is_eog(vocab, gguf_id))
        result.end_of_turn = {"token": token, "hf_id": hf_id, "gguf_id": gguf_id,
                              "is_eog": is_eog, "ok": is_eog and gguf_id == hf_id}
        if not result.end_of_turn["ok"]:
            result.problems.append(f"end of turn {token!r}: hf id {hf_id}, gguf id {gguf_id}, "
                                   f"ends generation in llama.cpp: {is_eog}")

        # 3. greedy generation from the same prompt
        template = chat_template_for(Path(hf_dir), chat_template)
        for question in questions:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": question}]
            if template:
                prompt = render_prompt(template, messages, bos_token=tokenizer.bos_token or "",
                                       eos_token=tokenizer.eos_token or "")
            else:
                prompt = (tokenizer.bos_token or "") + question
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=sorted(hf_eog),
                                     pad_token_id=tokenizer.pad_token_id
                                     if tokenizer.pad_token_id is not None else sorted(hf_eog)[0])
            hf_tokens = out[0, len(ids):].tolist()
            gguf_tokens: list[int] = []
            llm.reset()
            for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0, reset=True):
                gguf_tokens.append(int(tok))
                if llama_cpp.llama_vocab_is_eog(vocab, tok) or len(gguf_tokens) >= max_new_tokens:
                    break
            result.generations.append(GenerationRow(
                question=question, hf_tokens=hf_tokens, gguf_tokens=gguf_tokens,
                first_divergence=first_divergence(hf_tokens, gguf_tokens),
                hf_text=tokenizer.decode(hf_tokens),
                gguf_text=llm.detokenize(gguf_tokens).decode("utf-8", errors="replace")))
        needed = min(REQUIRED_IDENTICAL, len(result.generations))
        if require_generation and result.identical_generations < needed:
            result.problems.append(f"greedy generation identical for "
                                   f"{result.identical_generations} of "
                                   f"{len(result.generations)} questions (at least {needed} "
                                   "required for an unquantised file)")
    finally:
        llm.close()
    return result
