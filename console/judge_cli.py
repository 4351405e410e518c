"""`kyara judge`: score a data file on criteria, and calibrate a judge against the human
labels. Registered in console/cli.py with `app.add_typer(judge_app, name="judge")`.

    kyara judge DATA.jsonl --criteria personality,style [--judge NAME] [--persona P] [-o OUT]
    kyara judge calibrate [--persona ayane] [--judge NAME] [--criterion personality|a,b|all]
                          [--no-store]

`kyara judge DATA.jsonl` is short for `kyara judge score DATA.jsonl`. Progress goes to
stderr, tables to stdout. Judge reasoning and file contents are untrusted text: they are
printed escaped, never as markup. Heavy imports stay inside the commands.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from console.common import ConfigsOption, err, fail, out, safe, user_errors


class _ScoreByDefault(TyperGroup):
    """`kyara judge DATA.jsonl ...` runs `score`: a first word that is not a command
    (nor --help) is the data file."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["score", *args]
        return super().parse_args(ctx, args)


judge_app = typer.Typer(
    cls=_ScoreByDefault,
    help="Score data with an LLM judge; calibrate a judge against human labels.",
    no_args_is_help=True,
)

def _user_errors() -> tuple[type[BaseException], ...]:
    from pipelines.judge import JudgeError

    return user_errors(JudgeError)


def _progress(total: int, what: str) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=err)
    progress.add_task(safe(what), total=total)
    return progress


def _run(judge: Any, work: Any) -> Any:
    """Run the judge's coroutine; the judge is closed (pending verdicts written) even when
    interrupted."""
    async def main() -> Any:
        try:
            return await work
        finally:
            await judge.aclose()

    return asyncio.run(main())


@judge_app.command("score")
def score(
    data: Path = typer.Argument(..., help="JSONL: dialogues ({id, messages}) or "
                                          "calibration rows ({id, question, reply})"),
    criteria: Optional[str] = typer.Option(None, "--criteria", "-c",
                                           help="comma-separated; default: the judge's"),
    judge: Optional[str] = typer.Option(None, "--judge", "-j", help="configs/judges/<name>.yaml"),
    persona: Optional[str] = typer.Option(None, "--persona", "-p", help="persona name"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="write one row per item with its verdicts"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Judge every item on every criterion (resumable).

    Verdicts are stored as they come: run it again after an interruption and only what
    is missing is judged."""
    from pipelines.judge import Judge
    from pipelines.judge.batch import load_items, summarize, write_output
    from pipelines.workspace import Workspace

    try:
        ws = Workspace.load(configs)
        config = ws.judge(judge)
        names = [c.strip() for c in criteria.split(",") if c.strip()] if criteria else None
        names = names or list(config.criteria)
        items = load_items(data)
        j = Judge.open(ws, config.name, persona, criteria=names)
    except _user_errors() as exc:
        fail(str(exc))
    total = len(items) * len(names)
    progress = _progress(total, f"judge {j.name} · {', '.join(names)}")
    task_id = progress.task_ids[0]

    def seen(_interaction: Any, _verdict: Any) -> None:
        progress.advance(task_id)

    try:
        with progress:
            results = _run(j, j.score_items([i.interaction for i in items], names,
                                            on_verdict=seen))
        if output is not None:
            write_output(output, items, names, results)
    except _user_errors() as exc:
        fail(str(exc))
    _print_summary(summarize(results, names), j)
    if output is not None:
        err.print(f"wrote {len(items)} rows to {safe(str(output))}", soft_wrap=True)
    if j.fatal is not None:
        fail(str(j.fatal))
    failed = sum(v.status == "failed" for v in results.values())
    if failed:
        err.print(f"kyara: {failed} verdict(s) failed; run the same command again to retry "
                  "them", soft_wrap=True)
        raise typer.Exit(1)


def _print_summary(summaries: list[Any], judge: Any) -> None:
    table = Table(title=safe(f"judge {judge.name} ({judge.model}) · persona {judge.persona.id}"),
                  header_style="bold")
    table.add_column("criterion", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("weighted", justify="right")
    for score in range(1, 8):
        table.add_column(str(score), justify="right")
    table.add_column("invalid", justify="right")
    table.add_column("failed", justify="right")
    for s in summaries:
        table.add_row(
            safe(s.criterion), str(s.ok),
            f"{s.mean:.2f}" if s.mean is not None else "-",
            f"{s.weighted_mean:.2f}" if s.weighted_mean is not None else "-",
            *[str(s.distribution[k]) for k in range(1, 8)],
            str(s.invalid),
            str(s.failed) + (f" ({safe(', '.join(f'{k} {n}' for k, n in s.failures.items()))})"
                             if s.failures else ""),
        )
    out.print(table)


@judge_app.command("calibrate")
def calibrate_command(
    persona: Optional[str] = typer.Option(None, "--persona", "-p", help="persona name"),
    judge: Optional[str] = typer.Option(None, "--judge", "-j", help="configs/judges/<name>.yaml"),
    criterion: str = typer.Option("personality", "--criterion", "-c",
                                  help="the criterion the rows are labelled for; several "
                                       "comma-separated, or all (every labelled one)"),
    use_store: bool = typer.Option(True, "--store/--no-store",
                                   help="also the labels given in the console (the store)"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Agreement of the judge with the human labels: the persona's calibration.jsonl and
    the labels stored from the console, per criterion.

    Scores the labelled rows (anchors drawn from the other file rows), prints how many
    came from the file and from the store, Spearman's rho, exact and within-one accuracy,
    MAE and a confusion table, and saves them for the console to show."""
    from pipelines.judge import Judge, calibrate, save_calibration
    from pipelines.judge.calibrate import calibration_rows, labelled_criteria, stored_labels
    from pipelines.workspace import Workspace

    try:
        ws = Workspace.load(configs)
        wanted = [c.strip() for c in criterion.split(",") if c.strip()]
        if wanted == ["all"]:
            j = Judge.open(ws, judge, persona)
            wanted = labelled_criteria(j, use_store)
            if not wanted:
                fail(f"judge {j.name}: no criterion has labels (calibration.jsonl or the "
                     "store)")
        else:
            j = Judge.open(ws, judge, persona, criteria=wanted)
        counts = {name: len(calibration_rows(j.data.calibration, name)) + (
            len(stored_labels(j.store, j.persona.id, name)) if use_store else 0)
            for name in wanted}
        progress = _progress(sum(counts.values()), f"calibrate {j.name} · {', '.join(wanted)}")
        task_id = progress.task_ids[0]

        async def every() -> list[Any]:
            made = []
            for name in wanted:
                report, _ = await calibrate(j, name, use_store=use_store,
                                            on_verdict=lambda *_: progress.advance(task_id))
                made.append(report)
                if j.fatal is not None:
                    break
            return made

        with progress:
            reports = _run(j, every())
        for report in reports:
            path = save_calibration(ws.settings.home_path(), report)
    except _user_errors() as exc:
        fail(str(exc))
    for report in reports:
        _print_calibration(report)
    err.print(f"saved to {safe(str(path))}", soft_wrap=True)
    if j.fatal is not None:
        fail(str(j.fatal))


def _print_calibration(report: Any) -> None:
    a = report.agreement

    def pct(x: float | None) -> str:
        return f"{x:.1%}" if x is not None else "-"

    def num(x: float | None) -> str:
        return f"{x:.3f}" if x is not None else "-"

    out.print(safe(f"judge {report.judge} ({report.model}) · persona {report.persona} · "
                     f"{report.criterion} ({report.prompt_version}) · {report.date}"), soft_wrap=True)
    figures = Table(show_header=False, box=None)
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    figures.add_row("rows", f"{a.n} ({a.scored} scored, {a.invalid} invalid, {a.failed} failed)")
    sources = getattr(report, "sources", None) or {}
    if sources:
        figures.add_row("labels", f"{sources.get('file', 0)} from calibration.jsonl, "
                                  f"{sources.get('store', 0)} from the store")
    figures.add_row("Spearman ρ", num(a.spearman) + (f"  (p={a.spearman_p:.2g})"
                                                      if a.spearman_p is not None else ""))
    figures.add_row("Spearman ρ, weighted", num(a.spearman_weighted))
    figures.add_row("exact", pct(a.exact))
    figures.add_row("within ±1", pct(a.within_one))
    figures.add_row("mean absolute error", num(a.mae))
    out.print(figures)
    confusion = Table(title="human (rows) × judge (columns)", header_style="bold")
    confusion.add_column("")
    for score in range(1, 8):
        confusion.add_column(str(score), justify="right")
    for human in range(1, 8):
        confusion.add_row(str(human), *[str(n) if n else "·" for n in a.confusion[human - 1]])
    out.print(confusion)
