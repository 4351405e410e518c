"""Reading configuration files: text, YAML and JSON Lines into pydantic models, with every
failure a one-line ConfigError naming the file (and line) and the key path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from pipelines.config.errors import ConfigError, format_validation_error, short
from pipelines.files import jsonl_lines

M = TypeVar("M", bound=BaseModel)


def read_text(path: Path) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None


def read_yaml(path: Path) -> Any:
    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None


def _check_mapping(data: Any, source: str) -> None:
    if data is None:
        raise ConfigError(f"{source}: file is empty, expected a mapping of keys")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: (top level): expected a mapping of keys, found {type(data).__name__}"
        )


def validate(data: Any, model: type[M], source: str) -> M:
    _check_mapping(data, source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model)) from None


def validate_tagged(data: Any, union: TypeAdapter[Any], tag: str,
                    kinds: dict[str, type[BaseModel]], source: str, *,
                    tag_first: bool = False) -> Any:
    """A mapping into a discriminated union on `tag` (`backend:`, `job:`). A missing or
    unknown tag is named with the kinds there are; any other error as from the one model
    the tag picks (`model: missing required key`, not `hf.model`). `tag_first`: the tag
    must be the mapping's first key."""
    _check_mapping(data, source)
    if tag not in data:
        raise ConfigError(
            f"{source}: {tag}: missing required key (expected one of: {', '.join(kinds)})"
        )
    value = data[tag]
    if not isinstance(value, str) or value not in kinds:
        raise ConfigError(
            f"{source}: {tag}: expected one of: {', '.join(kinds)}; found {short(value)}"
        )
    if tag_first and next(iter(data)) != tag:
        raise ConfigError(f"{source}: {tag}: must be the first key of a {tag} file")
    try:
        return union.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, kinds[value], skip=1)) from None


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Read a YAML file into `model`; every failure is a one-line ConfigError."""
    path = Path(path)
    return validate(read_yaml(path), model, str(path))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, "file:line", parsed value) for each non-blank line of a JSON Lines
    file; a line that is not JSON is a ConfigError naming the file and line."""
    path = Path(path)
    for number, line in enumerate(jsonl_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            yield number, source, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def load_jsonl(path: str | Path, model: type[M]) -> list[M]:
    """Read a JSON Lines file, one `model` per non-blank line; errors name file and line."""
    return [validate(data, model, source) for _, source, data in iter_jsonl(path)]
