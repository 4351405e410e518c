"""`kyara data`: prepare a training file, and look at a training example token by token.
Registered in console/cli.py with `app.add_typer(data_app, name="data")`.

    kyara data prep IN.jsonl -o OUT.jsonl [--max-chars 120] [--min-chars 1]
    kyara data inspect DATA.jsonl --variant gemma3-270m-hf [-n 1] [--index 1]
    kyara data export sft|dpo|kto|labels -o FILE [--source human|judge] [--min-score N]
                      [--format trl|sharegpt]

File contents are untrusted text: printed escaped, never as markup. Heavy imports (the
tokenizer, transformers) stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from console.common import ConfigsOption, err, fail, out, safe

data_app = typer.Typer(help="Prepare training data; inspect what the model is trained on.",
                       no_args_is_help=True)


@data_app.command("export")
def export_command(
    kind: str = typer.Argument(..., help="sft, dpo, kto or labels"),
    output: Path = typer.Option(..., "--output", "-o", help="the JSON Lines file to write"),
    source: str = typer.Option("human", "--source", "-s",
                               help="human (labels, votes) or judge (its scores, the eval "
                                    "job's pairwise verdicts)"),
    min_score: Optional[int] = typer.Option(None, "--min-score",
                                            help="sft: only replies labelled at least this "
                                                 "(1-7) on every criterion, or thumbs up"),
    fmt: str = typer.Option("trl", "--format", "-f", help="trl (conversational) or sharegpt"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Training data from the store: chats (sft), preferences (dpo, kto) or the labels.
    Every row keeps its rendered prompt and where it came from."""
    from pipelines.config import ConfigError
    from pipelines.datasets import eval_dirs, export
    from pipelines.files import write_jsonl
    from pipelines.workspace import Workspace
    from store import Store, StoreError

    try:
        ws = Workspace.load(configs)
        store = Store.open(ws.settings.store_path())
        made = export(store, kind, source=source, min_score=min_score, fmt=fmt,
                      eval_dirs=eval_dirs(ws.settings.home_path()))
        if not made.rows:
            fail(f"nothing to export: {made.summary()} for --source {source}")
        write_jsonl(output, made.rows)
    except (ConfigError, StoreError, OSError) as exc:
        fail(str(exc))
    out.print(f"wrote {safe(made.summary())} to {safe(str(output))}", soft_wrap=True)


@data_app.command("prep")
def prep(
    source: Path = typer.Argument(..., help="conversations (JSON Lines with messages)"),
    output: Path = typer.Option(..., "--output", "-o", help="where to write the prepared file"),
    max_chars: int = typer.Option(120, help="drop conversations whose reply is longer"),
    min_chars: int = typer.Option(1, help="drop conversations whose reply is shorter"),
    final_mark: bool = typer.Option(True, help="add a final 。 where a reply lacks one"),
    dedupe: bool = typer.Option(True, help="drop exact duplicate conversations"),
) -> None:
    """NFC, whitespace, line breaks, a final 。, de-duplication and a length filter; prints
    a before/after report. The source file is never modified."""
    from pipelines.config import ConfigError
    from pipelines.training.data import PrepOptions, prepare_file

    try:
        report = prepare_file(source, output, PrepOptions(min_chars=min_chars, max_chars=max_chars,
                                                          add_final_mark=final_mark,
                                                          dedupe=dedupe))
    except ConfigError as exc:
        fail(str(exc))
    out.print(safe(report.text()), soft_wrap=True)
    out.print(f"wrote {safe(str(output))}", soft_wrap=True)


@data_app.command("inspect")
def inspect(
    data: Path = typer.Argument(..., help="conversations (JSON Lines with messages)"),
    variant: str = typer.Option(..., "--variant", "-v", help="an hf model variant"),
    count: int = typer.Option(1, "-n", help="how many examples to show"),
    index: int = typer.Option(1, "--index", "-i", help="the first example to show (1-based)"),
    persona: Optional[str] = typer.Option(None, "--persona", "-p", help="persona name"),
    prep: bool = typer.Option(True, help="apply data preparation first, as the train job does"),
    system: bool = typer.Option(True, help="add the persona's system prompt, as chat does"),
    max_seq_len: Optional[int] = typer.Option(None, help="truncate like the train job"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Print training examples as the model sees them: one token a line, trained or
    masked. Exit 1 when the label check would refuse to train on them."""
    from pipelines.config import ConfigError
    from pipelines.inference.sources import making_notice
    from pipelines.prompting import TemplateError
    from pipelines.training.labels import inspect_file
    from pipelines.workspace import Workspace

    try:
        ws = Workspace.load(configs)
        notice = making_notice(ws.variant(variant), ws.settings.home_path())
        if notice:  # the dequantised Gemma 3 270M on a fresh home: made now, once
            err.print(f"kyara: {safe(notice)}", soft_wrap=True)
        shown = inspect_file(ws, data, variant, persona=persona,
                             start=index - 1, count=count, prep=prep, system_prompt=system,
                             max_seq_len=max_seq_len)
    except (ConfigError, TemplateError) as exc:
        fail(str(exc))
    bad = 0
    for example in shown:
        title = f"example {example.index + 1}" + (f" ({example.id})" if example.id else "")
        out.print(f"[bold]{safe(title)}[/]", soft_wrap=True)
        out.print(safe(example.text), soft_wrap=True)
        out.print(safe(example.view), soft_wrap=True)
        if example.problems:
            bad += 1
            for problem in example.problems:
                err.print(f"[red]problem[/] {safe(problem)}", soft_wrap=True)
        else:
            out.print(f"[green]ok[/] the turn terminator {safe(example.terminator)} is "
                      "trained; BOS once", soft_wrap=True)
    if bad:
        raise typer.Exit(1)
