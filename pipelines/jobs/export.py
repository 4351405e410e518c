"""The `export` job: an `hf` variant (base, base + PEFT adapter, or merged model) -> GGUF
with llama.cpp's own converter -> quantised -> verified against the HF model -> registered
as `gguf` variants (store row + <home>/models/<name>.yaml).

Stages: validate, tools, merge adapter (or prepare), convert, quantise, verify, register.
With `lora_only: true` the adapter becomes a GGUF LoRA file (convert_lora_to_gguf.py) and
the base is converted beside it, so the registered variant is base GGUF + `lora_path`.

Everything is written into a temporary folder next to the output and renamed when verified;
an output that exists is refused unless `force: true`; an interrupted or failed export
leaves no output and registers nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines import events as ev
from pipelines import jobs
from pipelines.config import ConfigError, ExportJob, GGUFVariant, HFVariant
from pipelines.events import Event
from pipelines.jobs import JobContext

VERIFICATION = "verification"  # error kind: the GGUF does not behave like its source
EXPORT = "export"              # error kind: a converter or quantisation failure
VERIFICATION_FILE = "verification.json"


def output_dir(cfg: ExportJob, home: Path) -> Path:
    return jobs.output_dir(cfg.output, home, "exports", cfg.name)


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


def run(cfg: ExportJob, ctx: JobContext) -> Iterator[Event]:
    started = time.perf_counter()
    yield ev.start("export", cfg.name, f"{cfg.variant} -> GGUF {cfg.outtype}"
                   + (f" + {', '.join(cfg.quantize)}" if cfg.quantize else ""))

    # Everything the user can get wrong is checked before any work.
    yield ev.stage("validate", f"variant {cfg.variant}")
    from pipelines.export.convert import (
        ExportError,
        check_hf_dir,
        check_quant_types,
        convert_hf,
        convert_lora,
        quantize,
        stage_hf_dir,
    )
    from pipelines.export.tools import MARKER, converter_dir, tools_dir
    from pipelines.variants import register_variant

    quants = check_quant_types(cfg.quantize)
    variant, model_dir, adapter = _source(cfg, ctx)
    check_hf_dir(model_dir)
    try:
        GGUFVariant(name=f"{cfg.name}-{cfg.outtype}", backend="gguf", path=".")
    except Exception:
        raise ConfigError(f"name: '{cfg.name}' cannot name a variant (letters, digits, "
                          "_ . + - only)") from None
    out = output_dir(cfg, ctx.home)
    if out.exists() and not cfg.force:
        raise ConfigError(f"output: {out} exists (set force: true in the job file to "
                          "overwrite it)")
    persona_name = variant.persona or ctx.workspace.settings.default_persona
    persona_dir = ctx.workspace.persona_dir(persona_name)

    yield ev.stage("tools", "llama.cpp's converters")
    llama_cpp_dir = ctx.workspace.settings.llama_cpp_dir
    if not llama_cpp_dir and not (tools_dir(ctx.home) / MARKER).is_file():
        yield ev.log(f"first GGUF export: fetching llama.cpp's converters from the "
                     f"llama-cpp-python source distribution into {tools_dir(ctx.home)}")
    tools = converter_dir(ctx.home, llama_cpp_dir)
    yield ev.log(f"converters: {tools}")
    ctx.check_cancelled()

    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        staged = partial / "hf"
        merge = adapter is not None and not cfg.lora_only
        yield ev.stage("merge adapter" if merge else "prepare",
                       f"{adapter} into {model_dir.name}" if merge else str(model_dir))
        for line in stage_hf_dir(model_dir, staged, adapter=adapter if merge else None):
            yield ev.log(line)
        ctx.check_cancelled()

        yield ev.stage("convert", f"{model_dir.name} -> {cfg.outtype}")
        suffix = "-base" if cfg.lora_only else ""
        converted = partial / f"{cfg.name}{suffix}-{cfg.outtype}.gguf"
        yield from _logged(convert_hf(tools, staged, converted, cfg.outtype), ctx)
        files: dict[str, Path] = {cfg.outtype: converted}
        lora_file: Path | None = None
        if cfg.lora_only:
            lora_file = partial / f"{cfg.name}-lora-{cfg.outtype}.gguf"
            yield ev.log(f"adapter {adapter} -> {lora_file.name}")
            yield from _logged(convert_lora(tools, adapter, staged, lora_file, cfg.outtype), ctx)
        yield ev.metric("gguf_bytes", converted.stat().st_size, stage="convert")

        if quants:
            yield ev.stage("quantise", ", ".join(quants))
        for i, qtype in enumerate(quants):
            target = partial / f"{cfg.name}{suffix}-{qtype}.gguf"
            quantize(converted, target, qtype)
            files[qtype] = target
            yield ev.progress(i + 1, len(quants), "files", stage="quantise")
            yield ev.log(f"{target.name}: {target.stat().st_size / 2**20:.1f} MiB")
            ctx.check_cancelled()

        yield ev.stage("verify", f"{len(files)} file(s) against {variant.name}")
        from pipelines.export.verify import generation_required, load_hf, persona_texts
        from pipelines.export.verify import verify_gguf as check_one

        sentences, questions = persona_texts(persona_dir)
        system = ctx.workspace.persona(persona_name).prompts.system
        hf = load_hf(model_dir, adapter)
        results = {}
        for kind, path in files.items():
            result = check_one(path, model_dir, sentences=sentences, questions=questions,
                               system=system, adapter=adapter, lora_path=lora_file,
                               kind=kind if lora_file is None else f"lora + {kind} base",
                               require_generation=generation_required(kind), hf_model=hf)
            results[kind] = result
            for line in result.lines():
                yield ev.log(line)
            ctx.check_cancelled()
        del hf
        report = {kind: r.to_dict() for kind, r in results.items()}
        (ctx.run_dir / VERIFICATION_FILE).write_text(
            json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        failed = [f"{kind}: {'; '.join(r.problems)}" for kind, r in results.items()
                  if not r.passed]
        if failed:
            yield ev.error(VERIFICATION, "verification failed, nothing registered: "
                           + " | ".join(failed))
            return

        yield ev.stage("register", str(out))
        shutil.rmtree(staged, ignore_errors=True)
        (partial / VERIFICATION_FILE).write_text(
            json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        if out.exists():  # force: true (checked above)
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(partial, out)
    except ExportError as exc:
        yield ev.error(EXPORT, str(exc))
        return
    finally:
        shutil.rmtree(partial, ignore_errors=True)

    registered = []
    for kind, path in files.items():
        final = out / path.name
        name = f"{cfg.name}-{kind.lower()}"
        gguf_variant = GGUFVariant(
            name=name, backend="gguf", path=str(final),
            lora_path=str(out / lora_file.name) if lora_file else None,
            persona=variant.persona, generation=variant.generation,
            description=f"{variant.name} as GGUF {kind}" + (" + GGUF LoRA" if lora_file else ""))
        yaml_path = register_variant(ctx.store, gguf_variant, ctx.home,
                                     base=variant.model, run_id=ctx.run_id,
                                     note=f"exported by kyara job {cfg.name}")
        registered.append(name)
        yield ev.log(f"variant {name} registered: {yaml_path}")
    yield ev.done({
        "variants": registered,
        "output": str(out),
        "files": sorted(p.name for p in out.glob("*.gguf")),
        "verification": {kind: r.summary() for kind, r in results.items()},
        "seconds": round(time.perf_counter() - started, 3),
    })


def _logged(lines: Iterator[str], ctx: JobContext) -> Iterator[Event]:
    """A converter's output as log events; tqdm's in-between progress lines are dropped."""
    for line in lines:
        if "%|" in line and "100%|" not in line:
            continue
        yield ev.log(line, level="warning" if line.startswith(("WARNING", "ERROR")) else "info")
        ctx.check_cancelled()
