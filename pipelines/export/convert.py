"""HF folder -> GGUF with llama.cpp's own converters, run as subprocesses; quantisation
through `llama_cpp.llama_model_quantize`.

The steps are generators of log lines (the converter's output as it comes), so the export
job turns them into events and the plain API prints them.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.export.tools import CONVERT_HF, CONVERT_LORA
from pipelines.prompting import GEMMA_TEMPLATE


class ExportError(Exception):
    """An export that cannot go on (a converter failure, a failed verification). str() is
    one line."""


OUTTYPES = ("f16", "bf16", "f32", "q8_0")
# Model types whose chat format is Gemma's (their tokenizers may carry no template: the
# dequantised 270M has none; kyara's Gemma template is the one its prompts are made with).
GEMMA_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def quant_types() -> dict[str, int]:
    """llama.cpp's file types by name (Q4_K_M, Q8_0, F16, ...), from the installed runtime."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    types = {name[len(prefix):]: getattr(llama_cpp, name) for name in dir(llama_cpp)
             if name.startswith(prefix)}
    types["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return types


def check_quant_types(names: list[str], source: str = "quantize") -> list[str]:
    """The names in llama.cpp's spelling; a ConfigError listing the valid ones otherwise."""
    valid = quant_types()
    out: list[str] = []
    for name in names:
        key = str(name).strip().upper()
        if key not in valid:
            raise ConfigError(f"{source}: unknown quantisation type {name!r} (expected one of: "
                              f"{', '.join(sorted(valid))})")
        out.append(key)
    return out


# --- the HF folder the converter reads -----------------------------------------------------


def model_type(folder: Path) -> str:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get(
            "model_type", "")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder}: no readable config.json ({exc.__class__.__name__}): not "
                          "a Hugging Face model folder") from None


def check_hf_dir(folder: Path, trust_remote_code: bool = False) -> None:
    """One-line errors for a folder the converter would choke on, or that would run code
    of its own: llama.cpp's converter loads some architectures with trust_remote_code, so a
    folder whose config or tokenizer config names code (`auto_map`) is refused unless the
    job says `trust_remote_code: true`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: model folder not found")
    model_type(folder)
    if not trust_remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            try:
                data = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("auto_map"):
                raise ConfigError(f"{folder / name}: names code of its own (auto_map), which "
                                  "converting may run; set trust_remote_code: true in the "
                                  "export job only for a folder you trust")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise ConfigError(f"{folder}: no weights (*.safetensors / *.bin): not a complete "
                          "Hugging Face model folder")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise ConfigError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    for path in folder.glob("*.safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                fh.keys()
        except Exception as exc:
            raise ConfigError(f"{path}: unreadable safetensors file "
                              f"({' '.join(str(exc).split())[:120]})") from None


def chat_template_for(folder: Path, template: str | None = None) -> str | None:
    """The template the variant uses: the one given, else the tokenizer's, else Gemma's for
    a Gemma model."""
    if template:
        return template
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if isinstance(config.get("chat_template"), str):
        return config["chat_template"]
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if model_type(folder) in GEMMA_TYPES:
        return GEMMA_TEMPLATE
    return None


def stage_hf_dir(source: Path, staging: Path, *, adapter: Path | None = None,
                 chat_template: str | None = None) -> Iterator[str]:
    """Fill `staging` with what the converter reads: the model (weights linked, not copied;
    or base + adapter merged with PEFT's merge_and_unload), the chat template in
    tokenizer_config.json, and a tokenizer.model rebuilt from tokenizer.json when the folder
    has none and the tokenizer is a SentencePiece one."""
    source, staging = Path(source), Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    template = chat_template_for(source, chat_template)
    if adapter is not None:
        yield f"merging adapter {adapter} into {source.name} (PEFT merge_and_unload)"
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(staging)
        AutoTokenizer.from_pretrained(source).save_pretrained(staging)
        for name in ("tokenizer.model", "generation_config.json"):
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        del merged, base
    else:
        for path in source.iterdir():
            if path.is_dir():
                continue
            target = staging / path.name
            if path.name.endswith(WEIGHT_SUFFIXES):
                os.symlink(path.resolve(), target)
            else:
                shutil.copy2(path, target)
    fix_tokenizer(staging, template)
    yield from _describe_tokenizer(staging, template)


def fix_tokenizer(folder: Path, template: str | None) -> None:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if template:
        # tokenizer_config.json's template wins over chat_template.jinja in gguf-py: one
        # template, written in both places so nothing disagrees.
        config["chat_template"] = template
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    if not (folder / "tokenizer.model").is_file() and (folder / "tokenizer.json").is_file():
        from pipelines.export.spm import build_tokenizer_model

        data = build_tokenizer_model(folder / "tokenizer.json")
        if data is not None:
            (folder / "tokenizer.model").write_bytes(data)
            (folder / "kyara-tokenizer-model.txt").write_text(
                "tokenizer.model rebuilt by kyara from tokenizer.json (no tokenizer.model in "
                "the source folder)\n", encoding="utf-8")


def _describe_tokenizer(folder: Path, template: str | None) -> Iterator[str]:
    if (folder / "kyara-tokenizer-model.txt").is_file():
        yield ("no tokenizer.model in the source: rebuilt one from tokenizer.json (its own "
               "vocabulary and ids)")
    yield ("chat template: " + (f"{len(template)} characters, carried into tokenizer.chat_template"
                                if template else "none (the GGUF will have no chat template)"))


# --- converters -----------------------------------------------------------------------------


def run_script(tools: Path, script: str, args: list[str]) -> Iterator[str]:
    """Run one of llama.cpp's scripts with this Python; its output, line by line. A failure
    raises ExportError with the script's last error line."""
    command = [sys.executable, str(Path(tools) / script), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env.pop("NO_LOCAL_GGUF", None)  # the gguf-py of the same llama.cpp, not the installed one
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, encoding="utf-8",
                               errors="replace", cwd=str(tools), env=env)
    tail: list[str] = []
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            if not line:
                continue
            tail = (tail + [line])[-20:]
            yield line
        code = process.wait()
    finally:
        if process.poll() is None:  # the consumer stopped (cancel): stop the converter too
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    if code != 0:
        raise ExportError(f"{script} failed (exit {code}): {_last_error(tail)}")


def _last_error(lines: list[str]) -> str:
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error", "Exception", "raise")):
            return " ".join(line.split())[:300]
    return " ".join(lines[-1].split())[:300] if lines else "no output"


def convert_hf(tools: Path, hf_dir: Path, out: Path, outtype: str = "f16") -> Iterator[str]:
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype: expected one of {', '.join(OUTTYPES)}; found {outtype!r}")
    yield from run_script(tools, CONVERT_HF, [str(hf_dir), "--outfile", str(out),
                                              "--outtype", outtype])
    if not Path(out).is_file():
        raise ExportError(f"{CONVERT_HF} wrote no {out}")


def convert_lora(tools: Path, adapter: Path, base_hf_dir: Path, out: Path,
                 outtype: str = "f16") -> Iterator[str]:
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype: expected one of {', '.join(OUTTYPES)}; found {outtype!r}")
    staged = Path(out).parent / f".{Path(out).name}.adapter"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        stage_adapter(Path(adapter), staged)
        yield from run_script(tools, CONVERT_LORA, [str(staged), "--base", str(base_hf_dir),
                                                    "--outfile", str(out), "--outtype", outtype])
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if not Path(out).is_file():
        raise ExportError(f"{CONVERT_LORA} wrote no {out}")


def stage_adapter(adapter: Path, staged: Path) -> None:
    """The adapter folder as the LoRA converter is to see it, in `staged`: its files linked,
    and its model card without a `base_model` that is a folder on this machine. PEFT writes
    the path the base was loaded from there, and the converter records any `base_model` in
    the GGUF as a Hugging Face repo (`https://huggingface.co//home/...`). A hub id stays."""
    staged.mkdir(parents=True)
    for item in adapter.iterdir():
        if item.name != "README.md":
            (staged / item.name).symlink_to(item.resolve())
    card = adapter / "README.md"
    if card.is_file():
        (staged / "README.md").write_text(_card_without_local_base(card.read_text(
            encoding="utf-8", errors="replace")), encoding="utf-8")


def _card_without_local_base(text: str) -> str:
    import yaml

    if not text.startswith("---"):
        return text
    head, sep, body = text[3:].partition("\n---")
    try:
        meta = yaml.safe_load(head)
    except yaml.YAMLError:
        return body if sep else text  # a front matter nothing can read: drop it
    if not isinstance(meta, dict):
        return text
    bases = meta.get("base_model")
    bases = bases if isinstance(bases, list) else [bases]
    local = [b for b in bases
             if isinstance(b, str) and (b.startswith(("/", ".", "~")) or Path(b).exists())]
    if not local:
        return text
    kept = [b for b in bases if b not in local]
    if kept:
        meta["base_model"] = kept
    else:
        meta.pop("base_model")
    if isinstance(meta.get("tags"), list):
        meta["tags"] = [t for t in meta["tags"] if not any(str(t).endswith(":" + b) for b in local)]
    return "---\n" + yaml.safe_dump(meta, allow_unicode=True, sort_keys=False) + "---" + body


def quantize(source: Path, target: Path, qtype: str, threads: int | None = None) -> None:
    import llama_cpp

    ftype = quant_types()[qtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                          ctypes.byref(params))
    if code != 0 or not Path(target).is_file():
        raise ExportError(f"quantising {Path(source).name} to {qtype} failed (llama.cpp "
                          f"returned {code})")
