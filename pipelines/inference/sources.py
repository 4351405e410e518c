"""Where an hf variant's model comes from: one resolution for every place that loads one
(the HF backend, the train and export jobs, `kyara data inspect`).

A variant's `model:` is, in this order:

- a path that exists (taken from the kyara home when relative; `./` paths were already
  taken from the YAML file's folder): used as it is;
- a local path that does not exist: `models/…` (or any first folder kyara keeps in its
  home: runs/, exports/, …) is a path, never a hub id. The dequantised Gemma 3 270M
  (`<home>/models/gemma-3-270m-hf`) is made now from the embedded GGUF, the way that GGUF
  is assembled on first use; any other missing path fails at once, naming it;
- a hub id (`org/name`): a complete copy in the local Hugging Face cache is used as a
  folder, with no network at all; without one, offline (HF_HUB_OFFLINE=1, or the hub not
  reachable: probed once per process, PROBE_TIMEOUT_S at most) it fails at once naming the
  id and how to fetch it on a connected machine; online, the id goes to transformers,
  which downloads it.

Imports neither torch nor transformers (unless a dequantisation runs).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.config import ConfigError
from pipelines.home import EVOLVE, EXPORTS, MERGES, MODELS, RUNS, STORE, TOOLS, Home
from pipelines.inference.base import BackendError

PROBE_TIMEOUT_S = 2.0
_TRUE = {"1", "on", "yes", "true"}


class ModelSourceError(BackendError, ConfigError):
    """A model that is neither on disk nor fetchable now: one line naming it and the fix.
    Both a BackendError (the console, `kyara ask`) and a ConfigError (jobs, `kyara data`)."""


def resolve_path(value: str, home: Path | None) -> Path:
    """`~` and `$VARS` expanded; a relative path is taken from the kyara home, where models
    and runs live (configs are read from elsewhere, so the current directory means nothing)."""
    path = Path(os.path.expandvars(value)).expanduser()
    if not path.is_absolute() and home is not None:
        path = Path(home) / path
    return path


# The folders kyara writes under its home: `models/x` is a path there, never a hub id.
KYARA_HOME_DIRS = (MODELS, RUNS, EXPORTS, MERGES, EVOLVE, TOOLS, STORE)


def looks_like_hub_id(value: str) -> bool:
    """`org/name`: not a path the user typed (no leading ./, ~ or /, exactly one slash, and
    `org` is not a folder kyara keeps in its home). See sources.resolve_hf_model."""
    return (
        value.count("/") == 1 and not value.startswith((".", "~", "/", "$")) and "\\" not in value
        and value.split("/", 1)[0] not in KYARA_HOME_DIRS
    )


def is_hub_id(value: str, home: Path | None) -> bool:
    """`org/name`, unless `org` is a folder kyara keeps in its home (models/, runs/, …) or
    one that exists there: `models/gemma-3-270m-hf` is a path that is not made yet."""
    if not looks_like_hub_id(value):
        return False
    return not (home is not None and (Path(home) / value.split("/", 1)[0]).is_dir())


def resolve_hf_model(value: str, home: Path | None, *, variant: str,
                     local: bool = False) -> str:
    """What to hand to `from_pretrained` for an hf variant's `model:`: a folder, or (online,
    not cached, `local` false) the hub id. Raises ModelSourceError at once otherwise."""
    path = resolve_path(value, home)
    if path.exists():
        return str(path.resolve())
    if not is_hub_id(value, home):
        made = _make_known_folder(path, home, variant)
        if made is not None:
            return str(Path(made).resolve())
        raise ModelSourceError(f"variant {variant!r}: model folder not found: {path} "
                               f"({_how_made(path, home)})")
    cached = cached_snapshot(value)
    if cached is not None:
        return str(cached)
    fetch = (f"on a machine with network run `huggingface-cli download {value}`, then copy "
             f"its cache ({hub_cache_dir()}) here or point HF_HOME at a copy")
    if local:
        raise ModelSourceError(f"variant {variant!r}: model {value} is not in the local "
                               f"Hugging Face cache and this step reads files only: {fetch}")
    offline = hub_offline()
    if offline:
        raise ModelSourceError(f"variant {variant!r}: model {value} is not in the local "
                               f"Hugging Face cache and {offline}: {fetch}")
    return value


# --- the Hugging Face cache and the network ---------------------------------------------


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached folder of `repo_id` when it holds a whole model (config and weights);
    never touches the network."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), a bad id, no huggingface_hub
        return None
    weights = (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
               or any(folder.glob("*.safetensors.index.json")))
    return folder if (folder / "config.json").is_file() and weights else None


def hub_offline() -> str | None:
    """Why the hub cannot be reached (a few words), or None when it can."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}=1 is set"
    return probe_hub()


@functools.lru_cache(maxsize=1)
def probe_hub() -> str | None:
    """One TCP connection to the hub (or the HTTPS proxy), at most once per process and
    PROBE_TIMEOUT_S long, name resolution included (it runs in a thread that is not
    waited for beyond that): huggingface_hub's own retry loop would take a minute."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy or endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{host} cannot be reached ({exc.strerror or exc})")

    thread = threading.Thread(target=connect, name="kyara-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return result[0] if result else f"{host} did not answer within {PROBE_TIMEOUT_S:g} s"


# --- folders kyara makes ------------------------------------------------------------------

# Measured on 2 cores (Xeon, transformers 5): the GGUF's vocabulary is read twice (tokenizer,
# then model), so ~52 s, 3.4 GB peak memory, 1.1 GB on disk, once per home.
MAKING_COST = "once: about a minute and 3.5 GB of memory on 2 cores"


def making_notice(variant: object, home: Path | None) -> str | None:
    """A line to show before resolve_hf_model makes the variant's model folder (it takes a
    while), or None when nothing would be made."""
    from pipelines.inference.embedded import dequantized_source

    value = getattr(variant, "model", None)
    if not isinstance(value, str) or home is None:
        return None
    path = resolve_path(value, home)
    name = None if path.exists() else dequantized_source(path, home)
    return None if name is None else (f"making {path} from the embedded GGUF {name!r} "
                                      f"({MAKING_COST})")


def _make_known_folder(path: Path, home: Path | None, variant: str) -> Path | None:
    """A missing folder that kyara knows how to make, made now; None for any other."""
    from pipelines.inference.embedded import dequantized_source

    if home is None or (name := dequantized_source(path, home)) is None:
        return None
    from pipelines.inference.dequantize import dequantize_gguf
    from pipelines.inference.embedded import ensure_embedded

    try:
        return dequantize_gguf(ensure_embedded(name, home), path)
    except (ConfigError, BackendError, OSError) as exc:
        raise ModelSourceError(f"variant {variant!r}: cannot make {path} from the embedded "
                               f"GGUF {name!r}: {' '.join(str(exc).split())}") from None


def _how_made(path: Path, home: Path | None) -> str:
    if home is not None and path.is_relative_to(Home(home).runs):
        return "a train job writes it: kyara jobs run configs/jobs/<job>.yaml"
    if home is not None and path.is_relative_to(Home(home).merges):
        return "a merge job writes it: kyara jobs run configs/jobs/<job>.yaml"
    return "point the variant's model: at a transformers model folder or a hub id org/name"
