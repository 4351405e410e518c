"""`kyara data inspect`: training examples as the model will see them, token by token, with
their labels, and what the train job's label check says about them.

The same steps as the train job (data prep, the persona's system prompt, the variant's
chat template with the system text folded for Gemma, truncation to max_seq_len), using
only the tokenizer: no model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, HFVariant
from pipelines.training.data import PrepOptions, prepare, read_conversations
from pipelines.training.examples import (
    chat_template_for,
    check_labels,
    label_view,
    terminator,
    tokenize,
    with_system,
)


@dataclass
class Inspected:
    index: int
    id: str | None
    text: str            # the rendered text of prompt + completion
    view: str            # one line per token
    problems: list[str]
    terminator: str


def load_tokenizer(variant: HFVariant, home: Path) -> tuple[Any, str]:
    """The variant's tokenizer and its model type (for the template fallback)."""
    from transformers import AutoConfig, AutoTokenizer

    from pipelines.inference.sources import resolve_hf_model

    # one line at once when the model is nowhere (made first when kyara knows how)
    source = resolve_hf_model(variant.model, home, variant=variant.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model_type = AutoConfig.from_pretrained(source).model_type
    except OSError as exc:
        raise ConfigError(f"variant '{variant.name}': cannot load the tokenizer of {source}: "
                          f"{' '.join(str(exc).split())[:200]}") from None
    return tokenizer, model_type


def inspect_examples(rows: list[dict[str, Any]], tokenizer: Any, model_type: str, *,
                     system: str | None, start: int = 0, count: int = 1,
                     max_seq_len: int | None = None) -> list[Inspected]:
    if not 0 <= start < len(rows):
        raise ConfigError(f"example {start + 1} does not exist (the data has {len(rows)})")
    template = chat_template_for(tokenizer, model_type)
    end_text, end_id = terminator(tokenizer, template)
    out = []
    for index in range(start, min(len(rows), start + count)):
        example = tokenize(tokenizer, template, with_system(rows[index]["messages"], system),
                           max_seq_len, end_text)
        out.append(Inspected(
            index=index, id=rows[index].get("id"),
            text=tokenizer.decode(example.input_ids, skip_special_tokens=False),
            view=label_view(tokenizer, example.input_ids, example.labels),
            problems=check_labels(tokenizer, example.input_ids, example.labels, end_id),
            terminator=end_text))
    return out


def inspect_file(workspace: Any, data: str | Path, variant_name: str, *,
                 persona: str | None = None, start: int = 0, count: int = 1,
                 prep: bool = True, system_prompt: bool = True,
                 max_seq_len: int | None = None) -> list[Inspected]:
    variant = workspace.variant(variant_name)
    if not isinstance(variant, HFVariant):
        raise ConfigError(f"variant '{variant_name}' uses the {variant.backend} backend; "
                          "training (and so inspect) needs an hf variant, e.g. gemma3-270m-hf")
    rows = read_conversations(data)
    if prep:
        rows, _ = prepare(rows, PrepOptions())
    p = workspace.persona(persona)
    tokenizer, model_type = load_tokenizer(variant, workspace.settings.home_path())
    return inspect_examples(rows, tokenizer, model_type,
                            system=p.prompts.system if system_prompt else None,
                            start=start, count=count, max_seq_len=max_seq_len)
