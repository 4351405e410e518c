"""Measuring replies, in one place: the train job's mini-evaluation, the evolve fitness and
the eval job all generate and count through here.

    generate(model, tokenizer, questions, template=..., system=..., max_new_tokens=...)
        -> list[Reply]      batched (left-padded) greedy replies from a loaded HF model
    replies_from_backend(backend, system, questions, max_new_tokens)
        -> list[Reply]      the same through any ChatBackend (a GGUF, a server)
    end_of_generation_ids(model, tokenizer)
        -> {id: token}      what generation stops on (defined in pipelines.inference,
                            which the hf backend shares)
    figures(variant, replies, persona.speech)
        -> Figures          rates from pipelines.style.reply_style: the console's badges
                            (figures.style_figures: the same over stored records, the
                            eval job's results)
    table(before, after, targets)
        -> str              two sides' figures side by side

Dependencies point one way: this package imports pipelines.config, .prompting, .style and
.inference; training/ and merge/ import it, never the reverse. Torch is imported only
inside `generate`.
"""

from pipelines.evaluation.figures import Figures, figures, table
from pipelines.evaluation.generate import Reply, generate, prompt_ids, replies_from_backend
from pipelines.evaluation.results import build_results, load_results, write_results
from pipelines.evaluation.stats import (
    Estimate,
    PairedEstimate,
    Proportion,
    mean_ci,
    outcome_rates,
    paired_diff,
    wilson,
)
from pipelines.inference.end_of_generation import end_of_generation_ids

__all__ = ["Estimate", "Figures", "PairedEstimate", "Proportion", "Reply", "build_results",
           "end_of_generation_ids", "figures", "generate", "load_results", "mean_ci",
           "outcome_rates", "paired_diff", "prompt_ids", "replies_from_backend", "table",
           "wilson", "write_results"]
