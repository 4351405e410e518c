"""A variant made by a job, made visible: a configs-style YAML file in
`<home>/models/<name>.yaml`, which the workspace lists beside configs/models/ (a file in
configs/models/ of the same name wins: the user's own), and a row in the store's
`variants` table. One place for the train, merge and export jobs.

The row id is derived from the variant name, so running a job again replaces the row.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import HFVariant, Variant
from pipelines.files import write_atomic
from pipelines.home import Home

_NAMESPACE = uuid.UUID("0f5d3c52-7c1e-4c7a-9a43-2b1f6d8e9a10")


def home_models_dir(home: Path) -> Path:
    return Home(home).models


def variant_row_id(name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, name))


def trained_variant(base: HFVariant, name: str, adapter: Path, description: str) -> HFVariant:
    """The base variant's settings (model path as the base gives it: relative paths are
    taken from the kyara home by both) with the adapter; inference runs unquantised."""
    data = base.model_dump()
    data.update(name=name, adapter=str(Path(adapter).resolve()), description=description,
                load_in_4bit=False)
    return HFVariant.model_validate(data)


def write_variant_yaml(variant: Variant, home: Path, note: str) -> Path:
    """<home>/models/<name>.yaml, replaced whole (written aside, then renamed)."""
    folder = home_models_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{variant.name}.yaml"
    body = yaml.safe_dump(variant.model_dump(mode="json", exclude_none=True), allow_unicode=True,
                          sort_keys=False)
    return write_atomic(path, f"# {note}\n{body}")


def register(store: Any, variant: Variant, *, base: str, run_id: str, yaml_path: Path) -> dict:
    """The variant's row in the store (its adapter: a PEFT folder or a GGUF LoRA file)."""
    row = {
        "id": variant_row_id(variant.name),
        "name": variant.name,
        "backend": variant.backend,
        "base": base,
        "adapter": getattr(variant, "adapter", None) or getattr(variant, "lora_path", None),
        "path": str(yaml_path),
        "config_json": json.dumps(variant.model_dump(mode="json"), ensure_ascii=False),
        "source_run_id": run_id,
    }
    store.upsert("variants", [row])
    return row


def register_variant(store: Any, variant: Variant, home: Path, *, base: str, run_id: str,
                     note: str) -> Path:
    """Both at once: the YAML (whose first line is `note`) and the row. Returns the YAML."""
    yaml_path = write_variant_yaml(variant, home, note)
    register(store, variant, base=base, run_id=run_id, yaml_path=yaml_path)
    return yaml_path
