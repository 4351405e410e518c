"""The `export` job: an `hf` variant (base, base + PEFT adapter, or merged model) -> GGUF
with llama.cpp's own converter -> quantised -> verified against the HF model -> registered
as `gguf` variants (store row + <home>/models/<name>.yaml).

`run` is the list of its stages, each a function of its own:

    validate        validate        everything the user can get wrong, before any work
    fetch_tools     tools           llama.cpp's converters (fetched on first use)
    stage_model     merge adapter   the HF folder the converter reads (adapter merged in),
                    / prepare       in the temporary folder
    convert         convert         HF -> GGUF (and the adapter -> GGUF LoRA: lora_only)
    quantise        quantise        the converted file into each `quantize` type
    verify          verify          every file against the HF model (verification.json)
    publish         register        the temporary folder renamed into the output
    register        (no stage)      one gguf variant per file

With `lora_only: true` the adapter becomes a GGUF LoRA file (convert_lora_to_gguf.py) and
the base is converted beside it, so the registered variant is base GGUF + `lora_path`. With
`base_gguf:` as well (a gguf variant or a .gguf file of the same base, such as the packaged
Gemma 3 270M Q4_K_M), the base is not converted: the LoRA is verified on that file and the
one registered variant pairs them (this is how `make ayane-adapter` builds the shipped one).

Everything is written into a temporary folder next to the output and renamed when verified;
an output that exists is refused unless `force: true`; an interrupted or failed export
leaves no output and registers nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines import jobs
from pipelines.config import ConfigError, ExportJob, GGUFVariant, HFVariant
from pipelines.events import Event
from pipelines.files import replace_folder
from pipelines.home import EXPORTS
from pipelines.jobs import JobContext

VERIFICATION = "verification"  # error kind: the GGUF does not behave like its source
EXPORT = "export"              # error kind: a converter or quantisation failure
VERIFICATION_FILE = "verification.json"
MADE_BY = ".kyara-export"  # in every output an export publishes: what force may replace


def output_dir(cfg: ExportJob, home: Path) -> Path:
    return jobs.output_dir(cfg.output, home, EXPORTS, cfg.name)


def run(cfg: ExportJob, ctx: JobContext) -> Iterator[Event]:
    started = time.perf_counter()
    yield ev.start("export", cfg.name, f"{cfg.variant} -> GGUF {cfg.outtype}"
                   + (f" + {', '.join(cfg.quantize)}" if cfg.quantize else ""))
    src = yield from validate(cfg, ctx)
    tools = yield from fetch_tools(ctx)
    from pipelines.export.convert import ExportError

    partial = src.out.with_name(f".{src.out.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        staged = yield from stage_model(cfg, ctx, src, partial)
        files = yield from convert(cfg, ctx, src, tools, staged, partial)
        yield from quantise(cfg, ctx, src, files, partial)
        results = yield from verify(ctx, src, files)
        failed = [f"{kind}: {'; '.join(r.problems)}" for kind, r in results.items()
                  if not r.passed]
        if failed:
            yield ev.error(VERIFICATION, "verification failed, nothing registered: "
                           + " | ".join(failed))
            return
        yield from publish(src, staged, partial, results)
    except ExportError as exc:
        yield ev.error(EXPORT, str(exc))
        return
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    registered = yield from register(cfg, ctx, src, files)
    yield ev.done({
        "variants": registered,
        "output": str(src.out),
        "files": sorted(p.name for p in src.out.glob("*.gguf")),
        "verification": {kind: r.summary() for kind, r in results.items()},
        "seconds": round(time.perf_counter() - started, 3),
    })


@dataclass
class Source:
    """What validation found: the variant, its model folder and adapter, the quantisation
    types, where the export goes and the persona it is verified on."""

    variant: HFVariant
    model_dir: Path
    adapter: Path | None
    quants: list[str]
    out: Path
    persona: str
    persona_dir: Path
    base_gguf: Path | None = None        # with `base_gguf:`: the file the LoRA pairs with
    base_variant: GGUFVariant | None = None  # ... and the gguf variant it came from, if any


@dataclass
class Files:
    """The GGUF files made so far, by kind (outtype, then each quantisation type), and the
    GGUF LoRA file with `lora_only`."""

    by_kind: dict[str, Path]
    lora: Path | None = None


def validate(cfg: ExportJob, ctx: JobContext) -> Generator[Event, None, Source]:
    """Everything the user can get wrong, checked before any work."""
    yield ev.stage("validate", f"variant {cfg.variant}")
    from pipelines.export.convert import check_hf_dir, check_quant_types

    quants = check_quant_types(cfg.quantize)
    variant, model_dir, adapter = _source(cfg, ctx)
    check_hf_dir(model_dir, trust_remote_code=cfg.trust_remote_code)
    try:
        GGUFVariant(name=f"{cfg.name}-{cfg.outtype}", backend="gguf", path=".")
    except Exception:
        raise ConfigError(f"name: '{cfg.name}' cannot name a variant (letters, digits, "
                          "_ . + - only)") from None
    out = output_dir(cfg, ctx.home)
    if out.exists() and not cfg.force:
        raise ConfigError(f"output: {out} exists (set force: true in the job file to "
                          "overwrite it)")
    if out.exists():
        refuse_to_replace(out, ctx.home)
    persona = variant.persona or ctx.workspace.settings.default_persona
    base_gguf, base_variant = _base_gguf(cfg, ctx)
    return Source(variant, model_dir, adapter, quants, out, persona,
                  ctx.workspace.persona_dir(persona), base_gguf, base_variant)


def _base_gguf(cfg: ExportJob, ctx: JobContext) -> tuple[Path | None, GGUFVariant | None]:
    """`base_gguf:` as a file: a gguf variant's model file (an embedded one assembled) or a
    .gguf path (from the home when relative)."""
    if cfg.base_gguf is None:
        return None, None
    from pipelines.inference.base import BackendError
    from pipelines.inference.gguf import model_file
    from pipelines.inference.sources import resolve_path

    if cfg.base_gguf in ctx.workspace.variant_files():
        base = ctx.workspace.variant(cfg.base_gguf)
        if not isinstance(base, GGUFVariant):
            raise ConfigError(f"base_gguf: '{cfg.base_gguf}' is a {base.backend} variant; it "
                              "must name a gguf variant or a .gguf file")
        try:
            return model_file(base, ctx.home), base
        except BackendError as exc:
            raise ConfigError(f"base_gguf: {exc}") from None
    path = resolve_path(cfg.base_gguf, ctx.home)
    if not path.is_file():
        raise ConfigError(f"base_gguf: '{cfg.base_gguf}' is neither a gguf variant nor a file "
                          f"({path} not found)")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ConfigError(f"base_gguf: {path} is not a GGUF file")
    return path, None


def _source(cfg: ExportJob, ctx: JobContext) -> tuple[HFVariant, Path, Path | None]:
    from pipelines.inference.sources import resolve_hf_model, resolve_path

    variant = ctx.workspace.variant(cfg.variant)
    if not isinstance(variant, HFVariant):
        raise ConfigError(f"variant: '{cfg.variant}' is a {variant.backend} variant; export "
                          "takes an hf variant (a model folder, optionally with an adapter)")
    # a folder: the converter reads files (a hub id must be in the local cache)
    model = Path(resolve_hf_model(variant.model, ctx.home, variant=variant.name, local=True))
    adapter = resolve_path(variant.adapter, ctx.home) if variant.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"variant '{cfg.variant}': {adapter} is not a PEFT adapter folder "
                          "(no adapter_config.json)")
    if cfg.lora_only and adapter is None:
        raise ConfigError(f"lora_only: variant '{cfg.variant}' has no adapter to export")
    return variant, model, adapter


def fetch_tools(ctx: JobContext) -> Generator[Event, None, Path]:
    """llama.cpp's converters: `llama_cpp_dir` when set, else fetched once into the home."""
    from pipelines.export.tools import MARKER, converter_dir, tools_dir

    yield ev.stage("tools", "llama.cpp's converters")
    llama_cpp_dir = ctx.workspace.settings.llama_cpp_dir
    if not llama_cpp_dir and not (tools_dir(ctx.home) / MARKER).is_file():
        yield ev.log(f"first GGUF export: fetching llama.cpp's converters from the "
                     f"llama-cpp-python source distribution into {tools_dir(ctx.home)}")
    tools = converter_dir(ctx.home, llama_cpp_dir)
    yield ev.log(f"converters: {tools}")
    ctx.check_cancelled()
    return tools


def stage_model(cfg: ExportJob, ctx: JobContext, src: Source,
                partial: Path) -> Generator[Event, None, Path]:
    """The HF folder the converter reads, under `partial`: the adapter merged in unless
    `lora_only`."""
    from pipelines.export.convert import stage_hf_dir

    staged = partial / "hf"
    merge = src.adapter is not None and not cfg.lora_only
    yield ev.stage("merge adapter" if merge else "prepare",
                   f"{src.adapter} into {src.model_dir.name}" if merge else str(src.model_dir))
    for line in stage_hf_dir(src.model_dir, staged, adapter=src.adapter if merge else None):
        yield ev.log(line)
    ctx.check_cancelled()
    return staged


def _suffix(cfg: ExportJob) -> str:
    return "-base" if cfg.lora_only else ""


def convert(cfg: ExportJob, ctx: JobContext, src: Source, tools: Path, staged: Path,
            partial: Path) -> Generator[Event, None, Files]:
    """The staged folder as a GGUF of `outtype`; with `lora_only`, the adapter as a GGUF
    LoRA beside it."""
    from pipelines.export.convert import convert_hf, convert_lora

    if src.base_gguf is not None:  # the base is used as it is: only the adapter converts
        yield ev.stage("convert", f"adapter -> GGUF LoRA {cfg.outtype} on {src.base_gguf.name}")
        files = Files({src.base_gguf.stem: src.base_gguf})
    else:
        yield ev.stage("convert", f"{src.model_dir.name} -> {cfg.outtype}")
        converted = partial / f"{cfg.name}{_suffix(cfg)}-{cfg.outtype}.gguf"
        yield from _logged(convert_hf(tools, staged, converted, cfg.outtype), ctx)
        files = Files({cfg.outtype: converted})
    if cfg.lora_only:
        files.lora = partial / f"{cfg.name}-lora-{cfg.outtype}.gguf"
        yield ev.log(f"adapter {src.adapter} -> {files.lora.name}")
        yield from _logged(convert_lora(tools, src.adapter, staged, files.lora, cfg.outtype),
                           ctx)
    written = files.lora if src.base_gguf is not None else files.by_kind[cfg.outtype]
    yield ev.metric("gguf_bytes", written.stat().st_size, stage="convert")
    return files


def quantise(cfg: ExportJob, ctx: JobContext, src: Source, files: Files,
             partial: Path) -> Iterator[Event]:
    """The converted file into each quantisation type (added to `files`)."""
    from pipelines.export.convert import quantize

    if not src.quants:
        return
    yield ev.stage("quantise", ", ".join(src.quants))
    converted = files.by_kind[cfg.outtype]
    for i, qtype in enumerate(src.quants):
        target = partial / f"{cfg.name}{_suffix(cfg)}-{qtype}.gguf"
        quantize(converted, target, qtype)
        files.by_kind[qtype] = target
        yield ev.progress(i + 1, len(src.quants), "files", stage="quantise")
        yield ev.log(f"{target.name}: {target.stat().st_size / 2**20:.1f} MiB")
        ctx.check_cancelled()


def verify(ctx: JobContext, src: Source, files: Files) -> Generator[Event, None, dict[str, Any]]:
    """Every file against the HF model (loaded once) on the persona's sentences and eval
    questions; the report in the run's verification.json. Returns the Verification of each
    kind."""
    from pipelines.export import verify as checks

    yield ev.stage("verify", f"{len(files.by_kind)} file(s) against {src.variant.name}")
    sentences, questions = checks.persona_texts(src.persona_dir)
    system = ctx.workspace.persona(src.persona).prompts.system
    hf = checks.load_hf(src.model_dir, src.adapter)
    results = {}
    for kind, path in files.by_kind.items():
        result = checks.verify_gguf(
            path, src.model_dir, sentences=sentences, questions=questions, system=system,
            adapter=src.adapter, lora_path=files.lora,
            kind=kind if files.lora is None else _lora_kind(kind, path, src),
            require_generation=checks.generation_required(kind), hf_model=hf)
        results[kind] = result
        for line in result.lines():
            yield ev.log(line)
        ctx.check_cancelled()
    del hf
    (ctx.run_dir / VERIFICATION_FILE).write_text(_report(results), encoding="utf-8")
    return results


def _lora_kind(kind: str, path: Path, src: Source) -> str:
    """What a LoRA's verification names: the converted base's type, or the base file."""
    return f"lora on {path.name}" if src.base_gguf is not None else f"lora + {kind} base"


def made_by_kyara(folder: Path) -> bool:
    """An export's output: the marker publish writes, or (an export made before it) its
    verification report."""
    return (folder / MADE_BY).is_file() or (folder / VERIFICATION_FILE).is_file()


def refuse_to_replace(out: Path, home: Path) -> None:
    """`force: true` replaces an export kyara made, nothing else: never a folder without
    its marker, the home, or a folder holding the home or the current directory."""
    held = [p for p in (Path(home).resolve(), Path.cwd().resolve())
            if p == out or out in p.parents]
    if held:
        raise ConfigError(f"output: {out} holds {held[0]}; force: true replaces only an "
                          "export's own folder")
    if not out.is_dir() or not made_by_kyara(out):
        raise ConfigError(f"output: {out} was not made by a kyara export (no {MADE_BY} in "
                          "it); force: true replaces only kyara's own exports: choose "
                          "another output or remove it yourself")


def _report(results: dict[str, Any]) -> str:
    report = {kind: r.to_dict() for kind, r in results.items()}
    return json.dumps(report, ensure_ascii=False, indent=2)


def publish(src: Source, staged: Path, partial: Path, results: dict[str, Any]) -> Iterator[Event]:
    """The verified files (and their verification.json) renamed into the output; an
    output there before (`force: true`) is replaced."""
    yield ev.stage("register", str(src.out))
    out = src.out
    shutil.rmtree(staged, ignore_errors=True)
    (partial / VERIFICATION_FILE).write_text(_report(results), encoding="utf-8")
    (partial / MADE_BY).write_text(json.dumps({"job": "export", "name": src.variant.name},
                                              ensure_ascii=False) + "\n", encoding="utf-8")
    replace_folder(partial, out)  # an output there before: force: true (checked in validate)


def register(cfg: ExportJob, ctx: JobContext, src: Source,
             files: Files) -> Generator[Event, None, list[str]]:
    """One gguf variant per published file (store row + <home>/models/<name>.yaml);
    returns their names."""
    from pipelines.variants import register_variant

    variant, out, lora_file = src.variant, src.out, files.lora
    registered = []
    for kind, path in files.by_kind.items():
        lora = str(out / lora_file.name) if lora_file else None
        if src.base_gguf is not None:  # one variant: the base file as it is + the LoRA
            name = cfg.name
            base = src.base_variant or GGUFVariant(name=name, backend="gguf", path=str(path))
            gguf_variant = base.model_copy(update={  # the base variant's engine settings kept
                "name": name, "lora_path": lora, "persona": variant.persona,
                "generation": variant.generation,
                "description": f"{variant.name}: GGUF LoRA on {path.name}"})
        else:
            name = f"{cfg.name}-{kind.lower()}"
            gguf_variant = GGUFVariant(
                name=name, backend="gguf", path=str(out / path.name), lora_path=lora,
                persona=variant.persona, generation=variant.generation,
                description=f"{variant.name} as GGUF {kind}"
                + (" + GGUF LoRA" if lora_file else ""))
        yaml_path = register_variant(ctx.store, gguf_variant, ctx.home,
                                     base=variant.model, run_id=ctx.run_id,
                                     note=f"exported by kyara job {cfg.name}")
        registered.append(name)
        yield ev.log(f"variant {name} registered: {yaml_path}")
    return registered


def _logged(lines: Iterator[str], ctx: JobContext) -> Iterator[Event]:
    """A converter's output as log events; tqdm's in-between progress lines are dropped."""
    for line in lines:
        if "%|" in line and "100%|" not in line:
            continue
        yield ev.log(line, level="warning" if line.startswith(("WARNING", "ERROR")) else "info")
        ctx.check_cancelled()
