"""Safe literals for lance SQL filters (the `where` of Store.rows / Store.count).

Lance filters are DataFusion SQL: a string literal is single-quoted, a quote inside it is
doubled, and a backslash is an ordinary character. Build filters from values with quote(),
never with f-strings around raw text:  f"session_id = {quote(sid)}".
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def quote(value: str | float | bool | None) -> str:
    """One value as a SQL literal: 'it''s' for text, TRUE/FALSE, NULL, numbers as-is."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} as a SQL literal")
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"cannot write a {type(value).__name__} as a SQL literal")


def quote_list(values: Iterable[str | int | float | bool]) -> str:
    """A parenthesised list for IN: (  'a', 'b' ). Empty input gives (NULL), which matches nothing."""
    items = [quote(v) for v in values]
    return "(" + ", ".join(items or ["NULL"]) + ")"
