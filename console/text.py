"""Text from models, servers and files, made safe for a terminal: the one function every
path that prints such text uses (`kyara ask`, `retrieve`, `index --explain`, one-line
failures, the job lines, the TUI's `plain()`).

C0 controls (but the newline and tab kept), DEL and the C1 controls become visible `\\xNN`,
so an escape sequence in a reply (OSC 52 setting the clipboard, a retitled terminal, a
query whose answer lands in the shell) shows as text and does nothing. Escaping each
character, not parsing sequences, works on text streamed in pieces too."""

from __future__ import annotations

_CONTROLS = (*range(0x20), 0x7F, *range(0x80, 0xA0))


def _table(keep: str) -> dict[int, str]:
    return {c: f"\\x{c:02x}" for c in _CONTROLS if chr(c) not in keep}


_KEEP_LINES = _table("\n\t")
_ONE_LINE = _table("")


def visible(text: str, *, lines: bool = True) -> str:
    """`text` with its control characters as `\\xNN`; `lines=False` escapes newlines and
    tabs too (text meant for one line)."""
    return text.translate(_KEEP_LINES if lines else _ONE_LINE)
