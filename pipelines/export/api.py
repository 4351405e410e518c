"""The export steps as plain functions (no job, no events): what the quick-start adapter
(issue 8 item 6) and scripts call. Progress lines go to `say`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.export.convert import ExportError, convert_lora, stage_hf_dir
from pipelines.export.tools import converter_dir
from pipelines.export.verify import (
    Verification,
    generation_required,
    persona_texts,
    verify_gguf,
)

PACKAGED_PERSONAS = Path(__file__).resolve().parents[2] / "configs" / "personas"


def _print(message: str) -> None:
    print(message, flush=True)


def verify_export(gguf: str | Path, hf_dir: str | Path, *, adapter: str | Path | None = None,
                  lora_path: str | Path | None = None, persona_dir: str | Path | None = None,
                  kind: str = "f16", require_generation: bool | None = None,
                  n_threads: int | None = None) -> Verification:
    """Verify a GGUF (plus a GGUF LoRA `lora_path`) against the HF model in `hf_dir` (plus
    the PEFT `adapter`), on the persona's sentences and eval questions with its system
    prompt. Generation must match (4 of 5) only for unquantised kinds (f16, f32), unless
    `require_generation` says otherwise."""
    import yaml

    persona_dir = Path(persona_dir) if persona_dir else PACKAGED_PERSONAS / "ayane"
    sentences, questions = persona_texts(persona_dir)
    persona = yaml.safe_load((persona_dir / "persona.yaml").read_text(encoding="utf-8"))
    system = (persona.get("prompts") or {}).get("system")
    if require_generation is None:
        require_generation = generation_required(kind)
    return verify_gguf(Path(gguf), Path(hf_dir), sentences=sentences, questions=questions,
                       system=system, adapter=Path(adapter) if adapter else None,
                       lora_path=Path(lora_path) if lora_path else None, kind=kind,
                       require_generation=require_generation, n_threads=n_threads)


def export_lora_adapter(adapter_dir: str | Path, base_hf_dir: str | Path, out_path: str | Path,
                        *, base_gguf: str | Path | None = None, home: str | Path | None = None,
                        llama_cpp_dir: str | None = None, outtype: str = "f16",
                        persona_dir: str | Path | None = None, force: bool = False,
                        require_generation: bool | None = None, say: Callable[[str], None] = _print,
                        ) -> tuple[Path, Verification | None]:
    """A PEFT adapter (trained on the HF model `base_hf_dir`) -> a GGUF LoRA adapter at
    `out_path`, usable as a gguf variant's `lora_path` on a GGUF of that base.

    With `base_gguf`, the adapter is verified on it against HF base + adapter before the
    file is put in place (tokeniser and end of turn required; generation required only when
    the base GGUF is unquantised, i.e. its name says f16/f32); a failed verification raises
    ExportError and leaves nothing at `out_path`. Returns (path, verification or None)."""
    adapter_dir, base_hf_dir, out = Path(adapter_dir), Path(base_hf_dir), Path(out_path)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    if out.exists() and not force:
        raise ConfigError(f"{out}: exists (pass force=True to overwrite)")
    if home is None:  # the user's kyara home, KYARA_HOME and configs/kyara.yaml honoured
        from pipelines.workspace import Workspace

        home = Workspace.load().settings.home_path()
    home = Path(home)
    tools = converter_dir(home, llama_cpp_dir, say=say)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    check: Verification | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="kyara-export-") as tmp:
            staged = Path(tmp) / "base"
            for line in stage_hf_dir(base_hf_dir, staged):
                say(line)
            for line in convert_lora(tools, adapter_dir, staged, partial, outtype):
                say(line)
        if base_gguf is not None:
            if require_generation is None:
                require_generation = generation_required(Path(base_gguf).stem)
            kind = f"lora {outtype} on {Path(base_gguf).name}"
            check = verify_export(base_gguf, base_hf_dir, adapter=adapter_dir,
                                  lora_path=partial, persona_dir=persona_dir, kind=kind,
                                  require_generation=require_generation)
            for line in check.lines():
                say(line)
            if not check.passed:
                raise ExportError(f"verification failed: {'; '.join(check.problems)}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out, check


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
