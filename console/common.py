"""What every `kyara` command module shares: the two consoles, the --configs option, and
the one-line failure."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from console.text import visible

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigsOption = typer.Option(
    None, "--configs", envvar="KYARA_CONFIGS", help="the configs/ directory to use"
)


def safe(text: str) -> str:
    """Untrusted text for a Rich print: markup escaped, control characters visible."""
    return escape(visible(text))


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, no traceback; the message may hold untrusted text."""
    err.print(f"kyara: {safe(message)}", soft_wrap=True)
    raise typer.Exit(code)


def user_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """Errors whose message is for the user (shown as one line, exit status 2): the
    configuration's, the store's, a model's, a chat template's, and the caller's `more`."""
    from pipelines.config import ConfigError
    from pipelines.inference.base import BackendError
    from pipelines.prompting import TemplateError
    from store import StoreError

    return (ConfigError, StoreError, BackendError, TemplateError, *more)
