"""The token ids a transformers model ends a reply on, found one way for every caller: the
hf backend, export verification, the train job's mini-evaluation and the evolve fitness
(the last two through `pipelines.evaluation`, which re-exports it).

It lives here, beside the backends, rather than in `pipelines/evaluation/`: the hf backend
needs it, and evaluation depends on inference (it drives ChatBackends), never the reverse.
Torch-free: it reads the model's generation config and the tokenizer's vocabulary only.
"""

from __future__ import annotations

from typing import Any

END_OF_TURN = "<end_of_turn>"  # Gemma ends a turn with it; some configs list only <eos>


def end_of_generation_ids(model: Any, tokenizer: Any) -> dict[int, str]:
    """Every id generation should stop on, mapped to its token text, in this order: the
    model's generation config (`eos_token_id`, one id or a list), the tokenizer's EOS, and
    `<end_of_turn>` where the vocabulary has it. Duplicates and missing ids are dropped.

    `model` is anything with a `generation_config` (a PreTrainedModel or a PeftModel
    around one); `tokenizer` a transformers tokenizer. Pass `list(ids)` as generate()'s
    `eos_token_id`; `ids[token_id]` names the stopping token."""
    ids: list[Any] = []
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += declared if isinstance(declared, list) else [declared]
    ids.append(tokenizer.eos_token_id)
    if END_OF_TURN in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    found = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]
    return {i: tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(found)}
