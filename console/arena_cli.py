"""`kyara arena [--source human|judge]`: Bradley–Terry ratings per variant with 95%
bootstrap intervals, from the human votes and from the eval job's pairwise verdicts, and
how far the two agree. Registered in console/cli.py like `kyara report`.

Variant names are untrusted text: shown as Text, never parsed as markup. The fitting is in
pipelines/evaluation/arena.py (numpy, scipy; no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from console.common import ConfigsOption, err, fail, out, user_errors


def arena_table(board: Any) -> Table:
    """One arena as a table: rank, variant, rating [95% CI], Elo, games, W/T/L."""
    title = {"human": "human votes", "judge": "judge's pairwise verdicts"}.get(
        board.source, board.source)
    table = Table(title=Text(f"arena · {title} · {board.games} games"
                             + (f", {board.samples} bootstrap samples" if board.samples else "")),
                  header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("variant")
    table.add_column("rating [95% CI]", justify="right")
    table.add_column("Elo", justify="right")
    table.add_column("games", justify="right")
    table.add_column("W/T/L", justify="right")
    for rank, r in enumerate(board.ratings, start=1):
        ci = f" [{r.low:+.2f}, {r.high:+.2f}]" if r.low is not None else ""
        losses = r.games - r.wins - r.ties
        table.add_row(str(rank), Text(r.player), f"{r.rating:+.2f}{ci}", f"{r.elo:.0f}",
                      str(r.games), f"{r.wins}/{r.ties}/{losses}")
    return table


def agreement_text(a: Any) -> Text:
    if len(a.players) < 2:
        return Text(f"agreement: needs 2 variants rated by both, found {len(a.players)}")
    rho = f"{a.spearman:+.2f}" if a.spearman is not None else "n/a"
    return Text(f"agreement over {len(a.players)} variants: Spearman ρ {rho}; "
                f"{a.concordance:.0%} of {a.pairs} pairs ordered alike")


def boards(store: Any, home: Path, sources: list[str], *, samples: int = 1000, seed: int = 0,
           criterion: str | None = None) -> dict[str, Any]:
    """Each source's arena (pipelines.evaluation.arena): the human votes from the store, the
    judge's pairwise verdicts from the store and the eval runs under `home`."""
    from pipelines.datasets import eval_dirs
    from pipelines.evaluation.arena import arena as make_arena

    dirs = eval_dirs(home)
    return {name: make_arena(store, name, eval_dirs=dirs, samples=samples, seed=seed,
                             criterion=criterion) for name in sources}


def renderables(made: dict[str, Any]) -> tuple[list[Any], list[Text]]:
    """What `kyara arena` prints and the console's Arena screen shows: a table per arena
    (or why it has none), the agreement when both are there; and the warnings apart."""
    from pipelines.evaluation.arena import agreement

    shown: list[Any] = []
    warnings: list[Text] = []
    for name, board in made.items():
        if board.ratings:
            shown.append(arena_table(board))
        else:
            shown.append(Text(f"arena · {name}: no games yet"
                              + (" (vote in the console's blind A/B)" if name == "human"
                                 else " (an eval job with pairwise_criteria)")))
        if board.skipped:
            warnings.append(Text(f"{board.skipped} {name} preference(s) without two named "
                                 "variants left out"))
    if len(made) == 2:
        shown.append(agreement_text(agreement(made["human"], made["judge"])))
    return shown, warnings


def arena(
    source: Optional[str] = typer.Option(None, "--source", "-s",
                                         help="human or judge; default: both and their "
                                              "agreement"),
    criterion: Optional[str] = typer.Option(None, "--criterion", "-c",
                                            help="only the verdicts / votes on this criterion"),
    samples: int = typer.Option(1000, "--samples", min=0, help="bootstrap samples"),
    seed: int = typer.Option(0, "--seed", help="the bootstrap's seed"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Bradley–Terry ratings per variant with bootstrap intervals: from the human votes
    (blind A/B in the console), from the judge's pairwise verdicts (eval runs), and how far
    the two orders agree."""
    from pipelines.workspace import Workspace
    from store import Store

    if source not in (None, "human", "judge"):
        fail(f"--source is human or judge, not {source!r}")
    sources = [source] if source else ["human", "judge"]
    try:
        ws = Workspace.load(configs)
        store = Store.open(ws.settings.store_path())
        made = boards(store, ws.settings.home_path(), sources, samples=samples, seed=seed,
                      criterion=criterion)
    except user_errors() as exc:
        fail(str(exc))
    shown, warnings = renderables(made)
    for item in shown:
        out.print(item)
    for line in warnings:
        err.print(line, soft_wrap=True)
