"""Training examples: the exact token ids the model is trained on, their labels, and the
checks that refuse a run whose labels would teach the model never to stop.

One path from a conversation to tokens, shared with inference:

- the prompt is rendered by `pipelines.prompting.render_prompt` with the model's chat
  template (system text folded for Gemma) and tokenised with add_special_tokens=False,
  exactly as the hf backend tokenises a prompt before generating;
- the completion is what the same template renders after that prompt for the reply:
  the reply and its turn terminator (`<end_of_turn>\\n` for Gemma); a template that ends
  a turn without a terminator token gets the EOS token appended, since that is where
  generation must stop;
- labels are -100 on the prompt and the token ids on the completion (prompt-completion,
  assistant-only loss).

TRL's SFTTrainer gets these ids ready-made, so what is trained is what inference renders,
whatever transformers' own chat-template code would do. The trainer's collator output is
checked once more before the first step (`check_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.config import ConfigError
from pipelines.prompting import GEMMA_TEMPLATE, render_prompt

IGNORE = -100
GEMMA_TERMINATOR = "<end_of_turn>"


class LabelError(ConfigError):
    """Labels that would train a model that does not stop. str() is one line; `view` holds
    the token-by-token view of the example."""

    def __init__(self, message: str, view: str = "") -> None:
        super().__init__(message)
        self.view = view


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int

    def as_row(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


def chat_template_for(tokenizer: Any, model_type: str = "") -> str:
    """The template the hf backend renders with: the tokenizer's, else Gemma's for a Gemma
    base model that ships none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        return template
    if model_type.startswith("gemma"):
        return GEMMA_TEMPLATE
    raise ConfigError("the tokenizer has no chat template; set one (tokenizer_config.json "
                      "chat_template) so training renders what inference renders")


def terminator(tokenizer: Any, template: str) -> tuple[str, int]:
    """The token that ends an assistant turn: `<end_of_turn>` where the template writes it,
    else the EOS token."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rendered = render_prompt(template, probe, bos_token="", eos_token="",
                             add_generation_prompt=False)
    vocab = tokenizer.get_vocab()
    if GEMMA_TERMINATOR in rendered and GEMMA_TERMINATOR in vocab:
        return GEMMA_TERMINATOR, vocab[GEMMA_TERMINATOR]
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token and the chat template no "
                          "<end_of_turn>: nothing would teach the model to stop")
    return tokenizer.eos_token, tokenizer.eos_token_id


@dataclass
class ChatFormat:
    """What a train or prefer job tokenises with: the base model's tokenizer and config,
    its chat template and the token that ends an assistant turn."""

    tokenizer: Any
    model_config: Any
    template: str
    end_text: str
    end_id: int


def load_chat_format(model_dir: Any) -> ChatFormat:
    """The ChatFormat of a model folder; ConfigError (one line) when its tokenizer or
    config cannot be loaded."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model_config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model_dir}: cannot load the tokenizer: "
                          f"{' '.join(str(exc).split())[:200]}") from None
    template = chat_template_for(tokenizer, model_config.model_type)
    end_text, end_id = terminator(tokenizer, template)
    return ChatFormat(tokenizer, model_config, template, end_text, end_id)


def with_system(messages: Sequence[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The conversation as the console sends it: the persona's system prompt first, unless
    the conversation brings its own."""
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system and (not out or out[0]["role"] != "system"):
        out.insert(0, {"role": "system", "content": system})
    return out


def tokenize(tokenizer: Any, template: str, messages: Sequence[dict[str, Any]],
             max_len: int | None = None, end_text: str | None = None) -> Example:
    """Prompt (everything before the last message) and completion (the last, assistant,
    message) as ids and labels; truncated on the right to max_len like the trainer does."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ConfigError("a training conversation must end with an assistant message")
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    prompt = render_prompt(template, messages[:-1], bos_token=bos, eos_token=eos,
                           add_generation_prompt=True)
    full = render_prompt(template, messages, bos_token=bos, eos_token=eos,
                         add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ConfigError("the chat template renders the prompt differently when a reply "
                          "follows it; the completion cannot be told apart")
    completion = full[len(prompt):]
    if end_text is None:  # get_vocab() is slow on a 262k vocabulary: callers pass it in
        end_text, _ = terminator(tokenizer, template)
    if end_text not in completion:
        completion += eos  # a template without a turn terminator: stop on EOS
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + list(completion_ids)
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return Example(ids, labels, len(prompt_ids))


# --- checks ------------------------------------------------------------------------------


def check_labels(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int],
                 end_id: int) -> list[str]:
    """What is wrong with one example's labels ([] when nothing): the terminator missing
    or masked, padding equal to EOS masking it, BOS twice, nothing trained at all."""
    problems: list[str] = []
    ids = [int(i) for i in input_ids]
    labs = [int(x) for x in labels]
    end = tokenizer.convert_ids_to_tokens(end_id)
    trained = [i for i, x in enumerate(labs) if x != IGNORE]
    if not trained:
        problems.append("no token is trained (every label is masked)")
    elif end_id not in ids[trained[0]:]:
        problems.append(f"the turn terminator {end} is missing after the reply "
                        "(truncated by max_seq_len, or the template does not write it)")
    elif not any(labs[i] == end_id for i in range(trained[0], len(ids)) if ids[i] == end_id):
        pad = tokenizer.pad_token_id
        why = (" (the padding token is the EOS token and the collator masks padding)"
               if pad is not None and pad == end_id else "")
        problems.append(f"the turn terminator {end} is masked in the labels{why}")
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        problems.append("BOS appears twice at the start (the template writes it and the "
                        "tokenizer adds it again)")
    return problems


def _show(token: str) -> str:
    return repr(token)[1:-1] if token.strip() else repr(token)


def _text_of(tokenizer: Any, token_id: int, piece: str) -> str:
    """The token as text; its raw piece when it is part of a character (byte-level BPE
    splits kanji over tokens) and decodes to nothing readable alone."""
    text = tokenizer.decode([token_id])
    return piece if not text or "\ufffd" in text else text


def label_view(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """One line per token: position, id, trained or masked, the token."""
    lines = [f"{'pos':>5} {'id':>7}  {'label':7}  token"]
    ids = [int(i) for i in input_ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    for pos, (tid, piece, lab) in enumerate(zip(ids, pieces, labels, strict=True)):
        state = "masked" if int(lab) == IGNORE else "TRAINED"
        lines.append(f"{pos:>5} {tid:>7}  {state:7}  {_show(_text_of(tokenizer, tid, piece))}")
    return "\n".join(lines)


def compact_view(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int],
                 last: int = 8) -> str:
    """The end of an example on one line, `token[T]` trained / `token[M]` masked."""
    ids = [int(i) for i in input_ids][-last:]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    labs = list(labels)[-last:]
    return " ".join(f"{_show(_text_of(tokenizer, i, t))}[{'M' if int(x) == IGNORE else 'T'}]"
                    for i, t, x in zip(ids, pieces, labs, strict=True))


def require_good_labels(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int],
                        end_id: int, where: str = "") -> None:
    """Raise LabelError (one line + the full view) when check_labels finds a problem."""
    problems = check_labels(tokenizer, input_ids, labels, end_id)
    if problems:
        raise LabelError(
            f"{where}{'; '.join(problems)}; the example ends: "
            f"{compact_view(tokenizer, input_ids, labels)} — see it whole with: "
            "kyara data inspect DATA --variant VARIANT",
            label_view(tokenizer, input_ids, labels))
