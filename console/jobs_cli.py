"""`kyara jobs`: start, list, show and cancel runs from the shell (the jobs screen's twin).

Event text comes from jobs (exception messages, persona facts): it is printed as Text,
never parsed as markup. Heavy imports (the store: lancedb) stay inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from console.common import ConfigsOption, err, fail, out, user_errors

jobs_app = typer.Typer(help="Run jobs detached (train, index, ...) and follow them.",
                       no_args_is_help=True)

STATUS_STYLE = {"done": "green", "running": "cyan", "starting": "cyan", "error": "red",
                "cancelled": "yellow", "lost": "magenta"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from console.jobs import LaunchError

    return user_errors(LaunchError, LookupError)


def _open(configs: Optional[Path]) -> tuple[Any, Any]:
    from pipelines.workspace import Workspace
    from store import Store

    ws = Workspace.load(configs)
    return ws, Store.open(ws.settings.store_path())


def _print_event(event: Any) -> None:
    from console.jobs import describe

    style = {"error": "red", "done": "green", "stage": "bold"}.get(event.type, "")
    if event.type == "log" and event.level in ("warning", "error"):
        style = "yellow"
    out.print(Text(describe(event), style=style), soft_wrap=True)


@jobs_app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="a job file (configs/jobs/*.yaml)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="print its events until it ends"),
    force: bool = typer.Option(False, "--force", help="force: true for this run: replace an "
                               "existing output (export), start above max_cost_usd (eval)"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Start a job as a detached process (it survives this shell and SSH dropping)."""
    from console import jobs

    try:
        ws, store = _open(configs)
        handle = jobs.launch(config, ws, store=store, force=force)
    except _user_errors() as exc:
        fail(str(exc))
    out.print(Text(f"started run {handle.id} ({handle.kind} {handle.name}), pid {handle.pid}"))
    out.print(Text(f"run directory: {handle.run_dir}"))
    if not follow:
        return
    last = None
    try:
        for event in jobs.follow(handle):
            _print_event(event)
            last = event
    except KeyboardInterrupt:
        out.print(Text(f"stopped following; the run goes on (kyara jobs show {handle.id[:8]})"))
        raise typer.Exit(130) from None
    raise typer.Exit(0 if last is not None and last.type == "done" else 1)


@jobs_app.command("list")
def list_cmd(
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="how many runs, newest first"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Runs in the store, newest first, with their live status."""
    from console import jobs

    try:
        ws, store = _open(configs)
        runs = jobs.list_runs(store, limit=limit)
        from pipelines.jobs import offered_jobs

        _, problems = offered_jobs(ws)
    except _user_errors() as exc:
        fail(str(exc))
    for line in problems:  # a job file that does not load is named, never fatal
        err.print(Text(f"kyara: skipped job file: {line}"), soft_wrap=True)
    if not runs:
        out.print("no runs yet (kyara jobs run configs/jobs/<file>.yaml)")
        return
    rows = []
    for run in runs:
        started = run.created_at.astimezone().strftime("%m-%d %H:%M") if run.created_at else ""
        rows.append((run.id[:8], run.status, run.kind, run.name, started,
                     _short_summary(run.summary)))
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    columns = ("run", "status", "kind", "name", "started")
    widths = [min(32, max(len(c), *(len(row[i]) for row in rows))) for i, c in enumerate(columns)]
    for column, width in zip(columns, widths, strict=True):
        table.add_column(column, no_wrap=True, width=width, overflow="ellipsis")
    # The summary gets what the terminal has left (80 columns over SSH is the common case).
    rest = max(12, out.width - sum(widths) - 2 * len(widths))  # 2: the padding between
    table.add_column("summary", no_wrap=True, width=rest, overflow="ellipsis")
    for row in rows:
        table.add_row(*(Text(cell, style=STATUS_STYLE.get(cell, "") if i == 1 else "")
                        for i, cell in enumerate(row)))
    out.print(table)


def _short_summary(summary: Optional[dict], limit: int = 80) -> str:
    if not summary:
        return ""
    if "error" in summary and isinstance(summary["error"], dict):
        text = f"{summary['error'].get('kind')}: {summary['error'].get('message')}"
    else:
        text = ", ".join(f"{key} {value}" for key, value in summary.items()
                         if not isinstance(value, dict | list))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _find_run(configs: Path | None, run: str):
    """The run named on the command line (id, id prefix, run directory or name)."""
    from console import jobs

    try:
        _, store = _open(configs)
        return jobs.get_run(store, run)
    except _user_errors() as exc:
        fail(str(exc))


@jobs_app.command("show")
def show_cmd(
    run: str = typer.Argument(..., help="run id (or a unique prefix), run directory or name"),
    events: int = typer.Option(20, "--events", "-n", min=0, help="how many last events"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """One run: status, directory, summary and its last events."""
    from console import jobs

    handle = _find_run(configs, run)
    out.print(Text.assemble(("run ", "bold"), handle.id, "  ",
                            (handle.status, STATUS_STYLE.get(handle.status, ""))))
    out.print(Text(f"kind {handle.kind}, name {handle.name}, pid {handle.pid}"))
    out.print(Text(f"config {handle.config_path}"))
    out.print(Text(f"directory {handle.run_dir}"))
    if handle.status == jobs.LOST:
        out.print(Text(jobs.lost_reason(handle), style="magenta"), soft_wrap=True)
    if handle.summary:
        out.print(Text("summary " + json.dumps(handle.summary, ensure_ascii=False)),
                  soft_wrap=True)
    if handle.run_dir is not None and events:
        found, _ = jobs.tail(handle.run_dir, 0)
        for event in found[-events:]:
            _print_event(event)


@jobs_app.command("cancel")
def cancel_cmd(
    run: str = typer.Argument(..., help="run id (or a unique prefix), run directory or name"),
    force: bool = typer.Option(False, "--force", help="SIGKILL: no clean end (reads as lost)"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Ask a run to stop (SIGTERM to its process group)."""
    from console import jobs

    handle = _find_run(configs, run)
    if not jobs.cancel(handle, force=force):
        fail(f"run {handle.id[:8]} is not running (status {handle.status})", code=1)
    out.print(Text(f"sent {'SIGKILL' if force else 'SIGTERM'} to run {handle.id[:8]} "
                   f"(pid {handle.pid})"))
