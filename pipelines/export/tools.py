"""llama.cpp's converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`), matching the
installed llama-cpp-python, taken from that version's source distribution on first use.

- The sdist of llama-cpp-python carries llama.cpp as `vendor/llama.cpp/`: the converters,
  the `conversion/` package they import and the `gguf-py/` they put on their path (the gguf
  writer of the same commit: the installed `gguf` package may be older or newer than the
  runtime that reads the file). Only those are extracted, into
  `<home>/tools/llama.cpp-<version>/`; nothing of llama.cpp is in this repository.
- `pip download` fetches the sdist (it uses pip's own cache and index settings), into a
  temporary folder; the tools folder is written under a temporary name and renamed, so an
  interrupted fetch is fetched again, and a complete one is never fetched twice.
- `llama_cpp_dir` in configs/kyara.yaml points at a llama.cpp checkout instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path, PurePosixPath

from pipelines.config import ConfigError
from pipelines.files import rename
from pipelines.home import Home
from pipelines.processes import python

CONVERT_HF = "convert_hf_to_gguf.py"
CONVERT_LORA = "convert_lora_to_gguf.py"
MARKER = "kyara-tools.json"
# What is taken out of the sdist's vendor/llama.cpp/ (paths relative to it).
WANTED_FILES = (CONVERT_HF, CONVERT_LORA)
WANTED_DIRS = ("conversion/", "gguf-py/gguf/")

Say = Callable[[str], None]


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise ConfigError("GGUF export needs llama-cpp-python: pip install llama-cpp-python") \
            from None


def tools_dir(home: Path, version: str | None = None) -> Path:
    return Home(home).tools / f"llama.cpp-{version or llama_cpp_version()}"


def check_converter_dir(folder: Path, source: str) -> Path:
    # (conversion/ is not required: older llama.cpp keeps it all in convert_hf_to_gguf.py)
    missing = [name for name in WANTED_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{source}: {folder} has no {', '.join(missing)} "
                          "(expected a llama.cpp checkout)")
    return folder


def converter_dir(home: Path, llama_cpp_dir: str | None = None, say: Say | None = None,
                  sdist: Path | None = None) -> Path:
    """The folder holding the converters: `llama_cpp_dir` when set, else the cached tools
    folder for the installed llama-cpp-python, fetched first if missing. `sdist` uses a
    local source archive instead of the registry (tests)."""
    if llama_cpp_dir:
        folder = Path(os.path.expandvars(llama_cpp_dir)).expanduser()
        return check_converter_dir(folder, "configs/kyara.yaml: llama_cpp_dir")
    version = llama_cpp_version()
    target = tools_dir(home, version)
    if (target / MARKER).is_file():
        return target
    say = say or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="kyara-sdist-") as tmp:
        if sdist is None:
            say(f"first GGUF export: fetching llama.cpp's converters from the "
                f"llama-cpp-python {version} source distribution into {target}")
            sdist = download_sdist(version, Path(tmp))
        extract_converters(sdist, target, version)
    say(f"converters ready: {target}")
    return target


def download_sdist(version: str, into: Path) -> Path:
    command = [*python("-m", "pip"), "download", f"llama-cpp-python=={version}",
               "--no-deps", "--no-binary", ":all:", "-d", str(into),
               "--disable-pip-version-check", "--quiet"]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        result = None
        detail = str(exc)
    else:
        detail = (result.stderr or result.stdout).strip().splitlines()
        detail = detail[-1] if detail else f"pip exited with {result.returncode}"
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if result is None or not found:
        raise ConfigError(
            f"cannot fetch the llama-cpp-python {version} source distribution for its GGUF "
            f"converter ({' '.join(str(detail).split())[:200]}); set llama_cpp_dir in "
            "configs/kyara.yaml to a llama.cpp checkout instead")
    return found[0]


def extract_converters(sdist: Path, target: Path, version: str) -> Path:
    """Take vendor/llama.cpp/{convert_*.py, conversion/, gguf-py/gguf/} out of the sdist."""
    import json

    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            taken = 0
            for member in archive.getmembers():
                parts = PurePosixPath(member.name).parts
                if member.name.startswith("/") or ".." in parts:
                    raise ConfigError(f"{sdist}: refused: member {member.name!r} would land "
                                      "outside the tools folder")
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp"):
                    continue
                rel = "/".join(parts[3:])
                if not member.isfile():
                    continue
                if rel not in WANTED_FILES and not rel.startswith(WANTED_DIRS):
                    continue
                out = partial / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                if source is None:
                    continue
                with source, open(out, "wb") as fh:
                    shutil.copyfileobj(source, fh)
                taken += 1
        check_converter_dir(partial, str(sdist))
        (partial / MARKER).write_text(json.dumps({"llama_cpp_python": version,
                                                  "sdist": sdist.name, "files": taken}) + "\n",
                                      encoding="utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # no marker: an unfinished attempt
            shutil.rmtree(target)
        rename(partial, target)
    except (OSError, tarfile.TarError) as exc:
        raise ConfigError(f"{sdist}: cannot extract llama.cpp's converters: {exc}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
