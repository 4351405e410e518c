"""Entry point of the Textual chat console.

The console screens are not built yet (issue 5); until then `kyara chat` resolves the persona
and the model variant — so a bad configuration is reported now — and says so.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def run_app(workspace, persona, variant, resume: str | None = None) -> None:
    console = Console(highlight=False)
    console.print(
        f"kyara: persona [bold]{escape(persona.name)}[/] ({escape(persona.id)}), "
        f"variant [bold]{escape(variant.name)}[/] ({variant.backend}), "
        f"configs {escape(str(workspace.configs))}"
    )
    console.print(
        "kyara: the chat console is not built yet (issue 5); "
        "`kyara config check` and `kyara doctor` work now."
    )
