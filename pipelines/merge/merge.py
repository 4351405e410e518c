"""mergekit runs: validation of the *what* (mergekit's own MergeConfiguration), mapping of
the *how* (kyara's MergeOptions -> mergekit's MergeOptions), and a run that writes into a
temporary folder and renames it, reporting progress over the executor's output tasks.

mergekit 0.1.5's `run_merge` has no progress hook; its Executor yields each target (one
per saved tensor, plus the finalize step) as it finishes, so a counting Executor subclass
swapped in for the duration of the run is the seam.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, MergeOptions, format_validation_error
from pipelines.files import rename
from pipelines.plan.units import parse_size

Progress = Callable[[int, int], None]


def validate_merge_config(data: Any, source: str = "merge") -> Any:
    """A mergekit MergeConfiguration, or a one-line ConfigError naming the key."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mergekit configuration (a mapping), "
                          f"found {type(data).__name__}")
    try:
        config = MergeConfiguration.model_validate(data)
    except ValidationError as exc:
        line = format_validation_error(source, exc, MergeConfiguration)
        # put the `merge.` prefix on the key path: the user's file nests it under merge:
        raise ConfigError(line.replace(f"{source}: ", f"{source}.", 1)) from None
    except (RuntimeError, ValueError) as exc:  # mergekit's cross-field validators
        raise ConfigError(f"{source}: {' '.join(str(exc).split())}") from None
    known = sorted(m.spec.name for m in registry.registered_methods())
    if config.merge_method not in known:
        raise ConfigError(f"{source}.merge_method: expected one of: {', '.join(known)}; "
                          f"found {config.merge_method!r}")
    return config


def mergekit_options(options: MergeOptions, copy_tokenizer: bool = True) -> Any:
    """kyara's options -> mergekit's. Quiet: tqdm bars are not events."""
    from mergekit.options import MergeOptions as MKOptions

    return MKOptions(
        device=options.device,
        cuda=options.device == "cuda",
        out_shard_size=parse_size(options.out_shard_size),
        lazy_unpickle=options.lazy_unpickle,
        low_cpu_memory=options.low_cpu_memory,
        copy_tokenizer=copy_tokenizer,
        quiet=True,
        write_model_card=True,
    )


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output: {out} exists and is not empty; choose another output "
                          "or remove it")


def run_merge(config: Any, out: str | Path, options: MergeOptions,
              progress: Progress | None = None) -> Path:
    """Merge into `out` (which must be absent or empty) through a sibling temporary folder,
    renamed when complete, so a crash never leaves a half-written model under `out`."""
    import mergekit.merge as mk_merge
    from mergekit.graph import Executor

    out = Path(out).expanduser().resolve()
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    class CountingExecutor(Executor):
        def run(self, quiet: bool = False, desc: str | None = None):  # type: ignore[override]
            total = len(self.targets)
            for done, item in enumerate(super().run(quiet=quiet, desc=desc), start=1):
                if progress is not None:
                    progress(done, total)
                yield item

    # The swap is module state: serialise concurrent merges in one process.
    with _swap_lock:
        original = mk_merge.Executor
        mk_merge.Executor = CountingExecutor
        try:
            mk_merge.run_merge(config, str(tmp),
                               mergekit_options(options, copy_tokenizer=_has_tokenizer(config)))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            mk_merge.Executor = original
    if out.exists():
        out.rmdir()  # empty (checked above); rename needs it gone
    return rename(tmp, out)


_swap_lock = threading.Lock()


def _has_tokenizer(config: Any) -> bool:
    """mergekit copies the donor's (base or first model's) tokenizer; without tokenizer
    files it would try to build one and log a traceback, so only ask when there is one."""
    donor = config.base_model or config.referenced_models()[0]
    path = Path(donor.model.path)
    if not path.is_dir():
        return True  # a hub id: mergekit resolves it through the cache
    return (path / "tokenizer_config.json").is_file()


def check_variant_name(name: str) -> None:
    """A merge job's name names the variant it registers: refuse one that cannot, early."""
    from pipelines.config import HFVariant

    try:
        HFVariant(name=name, backend="hf", model=".")
    except Exception:
        raise ConfigError(f"name: '{name}' cannot name a variant (letters, digits, "
                          "_ . + - only)") from None


def register_merged(ctx: Any, name: str, out: Path, config: Any, description: str,
                    note: str) -> Path:
    """The merged model in `out` as an hf variant: <home>/models/<name>.yaml and a store row
    (its base: the mergekit config's base model, if any). Returns the YAML's path."""
    from pipelines.config import HFVariant
    from pipelines.variants import register_variant

    variant = HFVariant(name=name, backend="hf", model=str(out), description=description)
    base = str(config.base_model.model.path) if config.base_model else ""
    return register_variant(ctx.store, variant, ctx.home, base=base, run_id=ctx.run_id,
                            note=note)
