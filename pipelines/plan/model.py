"""What a model folder holds, from its safetensors headers and config.json (no weights
loaded, no torch): `inspect_model` -> `ModelStats`, and the shapes the estimators derive
from it (the train memory model's `ModelShape`, a KV cache's bytes)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.plan.units import MiB
from pipelines.training.memory import ModelShape


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: 8 bytes little-endian length, then JSON."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * MiB:
            raise ConfigError(f"{path}: not a safetensors file (header length {length})")
        try:
            return json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path}: not a safetensors file (header is not JSON)") from None


@dataclass
class ModelStats:
    path: Path
    params: int
    bytes: int                  # weights as stored
    shard_bytes: list[int]      # file size of each shard
    largest_tensor: int         # elements of the largest tensor
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype_bytes(self) -> float:
        return self.bytes / self.params if self.params else 2.0

    def get(self, *keys: str, default: Any = None) -> Any:
        """A config value, looking into text_config for multimodal configs."""
        for source in (self.config, self.config.get("text_config") or {}):
            for key in keys:
                if source.get(key) is not None:
                    return source[key]
        return default

    @property
    def layers(self) -> int:
        return int(self.get("num_hidden_layers", "n_layer", "num_layers", default=0))

    @property
    def hidden(self) -> int:
        return int(self.get("hidden_size", "n_embd", "d_model", default=0))

    @property
    def heads(self) -> int:
        return int(self.get("num_attention_heads", "n_head", default=1))

    @property
    def kv_heads(self) -> int:
        return int(self.get("num_key_value_heads", default=self.heads))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=(self.hidden // max(self.heads, 1)) or 64))

    @property
    def vocab(self) -> int:
        return int(self.get("vocab_size", default=32000))

    @property
    def intermediate(self) -> int:
        return int(self.get("intermediate_size", default=4 * self.hidden))


def resolve_model_dir(ref: str, base: Path | None = None) -> Path:
    """A local folder, else a Hugging Face id already in the local cache (never fetched)."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and base is not None and (base / path).is_dir():
        path = base / path
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:
        raise ConfigError(f"model '{ref}': not a local folder and not in the Hugging Face "
                          "cache; the planner reads headers only and does not download") from None


def inspect_model(ref: str | Path, base: Path | None = None) -> ModelStats:
    """Parameter count, stored bytes and shard sizes from the safetensors headers."""
    path = resolve_model_dir(str(ref), base)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no .safetensors files (the planner reads their headers)")
    params = stored = largest = 0
    for file in files:
        for name, info in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            params += count
            largest = max(largest, count)
            start, end = info["data_offsets"]
            stored += int(end) - int(start)
    config: dict[str, Any] = {}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return ModelStats(path=path, params=params, bytes=stored,
                      shard_bytes=[f.stat().st_size for f in files], largest_tensor=largest,
                      config=config)


def kv_cache(m: ModelStats, context: int, batch: int, bpp: float) -> int:
    return int(m.layers * 2 * m.kv_heads * m.head_dim * context * batch * bpp)


def model_shape(model_dir: str | Path, base_dir: Path | None = None,
                config: Any = None) -> ModelShape:
    """The shape the train memory model takes, from the safetensors headers (the exact
    parameter count); from a transformers config only where there are no local headers (a
    hub id whose weights are not downloaded yet), which `kyara plan` cannot read either."""
    try:
        return ModelShape.from_stats(inspect_model(model_dir, base_dir))
    except ConfigError:
        if config is None:
            raise
        return ModelShape.from_config(config)

