"""ConfigError and the one-line form of a pydantic ValidationError: the file, the key
path, what was expected and what was found."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(Exception):
    """A configuration problem the user can fix. str() is one line, no traceback needed."""


def _key_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def short(value: Any, limit: int = 60) -> str:
    """repr() of a found value, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(source: str, err: ValidationError, model: Any = None,
                            skip: int = 0) -> str:
    """One line: `source: key.path: expected ..., found ...` (+ how many more problems).
    `skip`: leading items of each error's location to leave out (a tagged union puts the
    tag there: `hf.model` is the key `model`)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = tuple(first.get("loc", ()))[skip:]
    kind = first.get("type", "")
    found = first.get("input")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        allowed = _allowed_keys(model, parent)
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        detail = f"unknown key '{loc[-1]}'{hint}"
    elif kind == "missing":
        detail = "missing required key"
    else:
        msg = first.get("msg", "invalid value")
        msg = msg[0].lower() + msg[1:] if msg else msg
        msg = msg.removeprefix("value error, ")
        detail = f"expected: {msg}; found {short(found)}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {_key_path(loc)}: {detail}{more}"


def _allowed_keys(model: Any, parent: tuple[Any, ...]) -> list[str]:
    """Field names of the sub-model at `parent`, for the 'unknown key' hint."""
    if model is None or not isinstance(model, type) or not issubclass(model, BaseModel):
        return []
    current: Any = model
    for part in parent:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return sorted(current.model_fields) if hasattr(current, "model_fields") else []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
