"""GGUF export end to end on tiny models: llama.cpp's converter (from the llama-cpp-python
sdist, cached: see conftest.py), quantisation, verification against HF, registration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_job
from store import Store

REPO = Path(__file__).resolve().parents[2]


def _one_line(message: str) -> str:
    assert message.strip() and "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture
def workspace(tmp_path, converter_tools, monkeypatch):
    """A configs/ tree with the Ayane persona, llama_cpp_dir on the cached converters, and
    a home of its own."""
    configs = tmp_path / "configs"
    (configs / "models").mkdir(parents=True)
    (configs / "jobs").mkdir()
    shutil.copytree(REPO / "configs" / "personas" / "ayane", configs / "personas" / "ayane")
    home = tmp_path / "home"
    (configs / "kyara.yaml").write_text(yaml.safe_dump(
        {"home": str(home), "llama_cpp_dir": str(converter_tools)}))
    monkeypatch.setenv("KYARA_HOME", str(home))
    return configs


def _variant(configs: Path, name: str, model: Path, adapter: Path | None = None) -> None:
    data = {"name": name, "backend": "hf", "model": str(model), "persona": "ayane"}
    if adapter:
        data["adapter"] = str(adapter)
    (configs / "models" / f"{name}.yaml").write_text(yaml.safe_dump(data))


def _run(configs: Path, tmp_path: Path, **job):
    from pipelines.jobs import JobContext
    from pipelines.jobs.export import run
    from pipelines.workspace import Workspace

    path = configs / "jobs" / f"{job['name']}.yaml"
    path.write_text(yaml.safe_dump({"job": "export", **job}, sort_keys=False))
    ws = Workspace.load(configs)
    run_dir = tmp_path / "runs" / job["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext.create(ws, run_dir, store=Store.open(ws.settings.store_path()))
    return list(run(load_job(path), ctx)), ctx


def _registered(ctx) -> list[str]:
    return sorted(r["name"] for r in ctx.store.rows("variants"))


def _last_logits(gguf: Path, prompt: str, lora: Path | None = None):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None,
                          n_ctx=256, logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.eval(ids)
        return llm.scores[len(ids) - 1].copy()
    finally:
        llm.close()


def test_gemma3_export_verified_and_registered(workspace, tmp_path, gemma3_dir):
    """Gemma-3-shaped, tokenizer without a chat template: f16 + Q8_0, same ids, same greedy
    tokens, Gemma template and end of turn carried, two gguf variants registered."""
    from pipelines.config import load_variant
    from pipelines.inference.gguf import GGUFBackend

    _variant(workspace, "tiny-gemma3", gemma3_dir)
    events, ctx = _run(workspace, tmp_path, name="tiny-gemma3-gguf", variant="tiny-gemma3",
                       quantize=["q8_0"])
    final = events[-1]
    assert final.type == "done", final
    stages = [e.stage for e in events if e.type == "stage"]
    assert stages == ["validate", "tools", "prepare", "convert", "quantise", "verify",
                      "register"]
    checks = final.summary["verification"]
    assert checks["f16"]["tokenizer"] == "20/20 identical"
    assert checks["f16"]["generation"] == "5/5 identical"
    assert checks["f16"]["end_of_turn"] is True
    assert checks["Q8_0"]["generation"] == "not required (quantised file)"
    assert checks["Q8_0"]["greedy_identical"].endswith("/5 identical")  # reported only
    assert any("verification of" in (e.message or "") for e in events if e.type == "log")
    report = json.loads((ctx.run_dir / "verification.json").read_text(encoding="utf-8"))
    assert report["f16"]["passed"] is True
    assert sorted(final.summary["variants"]) == ["tiny-gemma3-gguf-f16", "tiny-gemma3-gguf-q8_0"]
    assert _registered(ctx) == ["tiny-gemma3-gguf-f16", "tiny-gemma3-gguf-q8_0"]
    variant = load_variant(ctx.home / "models" / "tiny-gemma3-gguf-f16.yaml")
    backend = GGUFBackend(variant, ctx.home)
    try:
        assert "<start_of_turn>" in backend.chat_template  # carried in the GGUF metadata
        assert "<end_of_turn>" in backend.eog_tokens.values()
    finally:
        backend.close()


def test_gguf_without_tokenizer_model_keeps_its_vocabulary(workspace, tmp_path, gemma3_dir):
    """Like a model dequantised from a GGUF: tokenizer.json only. The export rebuilds the
    SentencePiece model from it, and the GGUF splits text exactly as the HF tokenizer."""
    folder = tmp_path / "no-spm"
    shutil.copytree(gemma3_dir, folder)
    (folder / "tokenizer.model").unlink()
    _variant(workspace, "tiny-nospm", folder)
    events, _ = _run(workspace, tmp_path, name="tiny-nospm-gguf", variant="tiny-nospm")
    assert events[-1].type == "done", events[-1]
    assert any("rebuilt one from tokenizer.json" in (e.message or "") for e in events)
    assert events[-1].summary["verification"]["f16"]["tokenizer"] == "20/20 identical"


def test_llama_export_matches_hf(workspace, tmp_path, llama_dir):
    """Llama-shaped with a template that takes a system message; f32 (a random tiny model's
    near-ties flip under f16 rounding; f16 is the Gemma test's)."""
    _variant(workspace, "tiny-llama", llama_dir)
    events, _ = _run(workspace, tmp_path, name="tiny-llama-gguf", variant="tiny-llama",
                     outtype="f32")
    assert events[-1].type == "done", events[-1]
    check = events[-1].summary["verification"]["f32"]
    assert check["tokenizer"] == "20/20 identical" and check["passed"] is True


def test_lora_only_adapter_changes_output_like_hf(workspace, tmp_path, gemma3_dir,
                                                  gemma3_adapter):
    _variant(workspace, "tiny-ayane", gemma3_dir, gemma3_adapter)
    events, ctx = _run(workspace, tmp_path, name="tiny-lora", variant="tiny-ayane",
                       lora_only=True)
    final = events[-1]
    assert final.type == "done", final
    check = final.summary["verification"]["f16"]
    assert check["kind"] == "lora + f16 base" and check["generation"] == "5/5 identical"
    out = Path(final.summary["output"])
    base, lora = out / "tiny-lora-base-f16.gguf", out / "tiny-lora-lora-f16.gguf"
    assert base.is_file() and lora.is_file()
    prompt = "<bos><start_of_turn>user\n紅茶は好き？<end_of_turn>\n<start_of_turn>model\n"
    import numpy as np

    plain, adapted = _last_logits(base, prompt), _last_logits(base, prompt, lora)
    assert np.abs(plain - adapted).max() > 1e-2  # the GGUF adapter is applied
    variant = yaml.safe_load((ctx.home / "models" / "tiny-lora-f16.yaml").read_text())
    assert variant["lora_path"] == str(lora) and variant["path"] == str(base)

    # PEFT's model card names the base by the folder it was loaded from; the GGUF does not
    assert f"base_model: {gemma3_dir}" in (gemma3_adapter / "README.md").read_text()
    strings = _gguf_strings(lora)
    assert strings["general.type"] == "adapter"
    assert not [k for k, v in strings.items() if str(gemma3_dir) in v or "huggingface.co//" in v]
    assert not list(out.glob(".*.adapter"))  # the staged copy is gone


def _gguf_strings(path: Path) -> dict[str, str]:
    """Every metadata value of a GGUF file, as text."""
    from gguf import GGUFReader

    return {key: str(field.contents()) for key, field in GGUFReader(path).fields.items()
            if not key.startswith("tokenizer.")}


def test_a_hub_base_model_stays_on_the_card():
    from pipelines.export.convert import _card_without_local_base

    card = ("---\nbase_model: google/gemma-2-2b-jpn-it\nlibrary_name: peft\ntags:\n"
            "- base_model:adapter:google/gemma-2-2b-jpn-it\n- lora\n---\n\n# Model Card\n")
    assert _card_without_local_base(card) == card
    local = card.replace("google/gemma-2-2b-jpn-it", "/srv/models/gemma-2-2b-jpn-it")
    meta = yaml.safe_load(_card_without_local_base(local).split("---")[1])
    assert meta == {"library_name": "peft", "tags": ["lora"]}
    assert _card_without_local_base(local).endswith("---\n\n# Model Card\n")


def test_merged_adapter_export(workspace, tmp_path, gemma3_dir, gemma3_adapter):
    _variant(workspace, "tiny-merged", gemma3_dir, gemma3_adapter)
    events, _ = _run(workspace, tmp_path, name="tiny-merged-gguf", variant="tiny-merged")
    assert "merge adapter" in [e.stage for e in events if e.type == "stage"]
    assert events[-1].type == "done", events[-1]
    assert events[-1].summary["verification"]["f16"]["passed"] is True


def test_unknown_quant_type_refused_before_work(workspace, tmp_path, gemma3_dir):
    _variant(workspace, "tiny-q", gemma3_dir)
    with pytest.raises(ConfigError) as caught:
        _run(workspace, tmp_path, name="tiny-q-gguf", variant="tiny-q", quantize=["Q4_K_XL"])
    message = _one_line(str(caught.value))
    assert "Q4_K_XL" in message and "Q4_K_M" in message
    assert not (tmp_path / "home" / "exports").exists()
    assert not (tmp_path / "home" / "models").exists()


def test_existing_output_refused_without_force(workspace, tmp_path, gemma3_dir):
    _variant(workspace, "tiny-o", gemma3_dir)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError) as caught:
        _run(workspace, tmp_path, name="tiny-o-gguf", variant="tiny-o", output=str(out))
    assert "force: true" in _one_line(str(caught.value))
    assert not (tmp_path / "home" / "models").exists()


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_corrupt_input_folder(workspace, tmp_path, gemma3_dir, damage):
    folder = tmp_path / "broken"
    shutil.copytree(gemma3_dir, folder)
    if damage == "config":
        (folder / "config.json").write_text("{not json")
    else:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    _variant(workspace, "tiny-broken", folder)
    with pytest.raises(ConfigError) as caught:
        _run(workspace, tmp_path, name="tiny-broken-gguf", variant="tiny-broken")
    _one_line(str(caught.value))
    assert not (tmp_path / "home" / "models").exists()
    assert not (tmp_path / "home" / "exports").exists()


def test_failed_verification_registers_nothing(workspace, tmp_path, gemma3_dir, monkeypatch):
    """A GGUF whose vocabulary splits text differently: error event, no output, no variant."""
    from pipelines.export import verify

    real = verify.verify_gguf

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result.problems.append("the GGUF vocabulary splits 1 of 20 sentences differently")
        return result

    monkeypatch.setattr(verify, "verify_gguf", broken)
    _variant(workspace, "tiny-v", gemma3_dir)
    events, ctx = _run(workspace, tmp_path, name="tiny-v-gguf", variant="tiny-v")
    assert events[-1].type == "error" and events[-1].kind == "verification"
    _one_line(events[-1].message)
    assert not (ctx.home / "exports" / "tiny-v-gguf").exists()
    assert not (ctx.home / "models").exists() and _registered(ctx) == []
    assert (ctx.run_dir / "verification.json").is_file()


@pytest.mark.slow
def test_converters_fetched_once_from_the_registry(tmp_path):
    """A fresh home: the first use fetches the installed llama-cpp-python's sdist with pip
    and extracts only the converters (said on screen); the second use fetches nothing."""
    from pipelines.export import tools

    said: list[str] = []
    folder = tools.converter_dir(tmp_path, say=said.append)
    assert folder == tools.tools_dir(tmp_path)
    assert (folder / tools.CONVERT_HF).is_file() and (folder / tools.CONVERT_LORA).is_file()
    assert (folder / "gguf-py" / "gguf" / "gguf_writer.py").is_file()
    assert not any(p.suffix in (".c", ".cpp", ".h") for p in folder.rglob("*"))
    assert any("fetching llama.cpp's converters" in line for line in said)
    said.clear()
    assert tools.converter_dir(tmp_path, say=said.append) == folder
    assert not any("fetching" in line for line in said)


def test_lora_on_an_existing_base_gguf(workspace, tmp_path, gemma3_dir, gemma3_adapter):
    """`base_gguf:` pairs the GGUF LoRA with a GGUF of the base that already exists (a gguf
    variant, or a file): the base is not converted again, the LoRA is verified on it (the
    generation check by its name: waived on Q8_0, required on f16) and one variant is
    registered that keeps the base where it is."""
    import numpy as np

    _variant(workspace, "tiny-g3", gemma3_dir)
    events, ctx = _run(workspace, tmp_path, name="tiny-base", variant="tiny-g3",
                       quantize=["q8_0"])
    assert events[-1].type == "done", events[-1]
    base_q8 = ctx.home / "exports" / "tiny-base" / "tiny-base-Q8_0.gguf"
    base_f16 = ctx.home / "exports" / "tiny-base" / "tiny-base-f16.gguf"
    assert base_q8.is_file() and base_f16.is_file()

    _variant(workspace, "tiny-ayane", gemma3_dir, gemma3_adapter)
    events, ctx = _run(workspace, tmp_path, name="tiny-on-q8", variant="tiny-ayane",
                       lora_only=True, base_gguf="tiny-base-q8_0")
    final = events[-1]
    assert final.type == "done", final
    stages = {e.stage: e.message for e in events if e.type == "stage"}
    assert stages["convert"] == "adapter -> GGUF LoRA f16 on tiny-base-Q8_0.gguf"
    check = final.summary["verification"]["tiny-base-Q8_0"]
    assert check["kind"] == "lora on tiny-base-Q8_0.gguf"
    assert check["generation"] == "not required (quantised base)" and check["passed"] is True
    out = Path(final.summary["output"])
    assert final.summary["files"] == ["tiny-on-q8-lora-f16.gguf"]  # the base stays put
    assert final.summary["variants"] == ["tiny-on-q8"]
    variant = yaml.safe_load((ctx.home / "models" / "tiny-on-q8.yaml").read_text())
    assert variant["path"] == str(base_q8)
    assert variant["lora_path"] == str(out / "tiny-on-q8-lora-f16.gguf")
    prompt = "<bos><start_of_turn>user\n紅茶は好き？<end_of_turn>\n<start_of_turn>model\n"
    plain = _last_logits(base_q8, prompt)
    adapted = _last_logits(base_q8, prompt, out / "tiny-on-q8-lora-f16.gguf")
    assert np.abs(plain - adapted).max() > 1e-2

    events, _ = _run(workspace, tmp_path, name="tiny-on-f16", variant="tiny-ayane",
                     lora_only=True, base_gguf=str(base_f16))  # a file, not a variant
    assert events[-1].type == "done", events[-1]
    check = events[-1].summary["verification"]["tiny-base-f16"]
    assert check["generation"] == "5/5 identical"  # unquantised: required, and it matches


def test_base_gguf_refusals_are_one_line(workspace, tmp_path, gemma3_dir, gemma3_adapter):
    _variant(workspace, "tiny-ayane", gemma3_dir, gemma3_adapter)
    with pytest.raises(ConfigError) as caught:  # the config itself
        _run(workspace, tmp_path, name="x1", variant="tiny-ayane", base_gguf="whatever")
    assert "lora_only" in _one_line(str(caught.value))
    with pytest.raises(ConfigError) as caught:
        _run(workspace, tmp_path, name="x2", variant="tiny-ayane", lora_only=True,
             base_gguf="tiny-ayane")
    assert "hf variant" in _one_line(str(caught.value))
    not_gguf = tmp_path / "base.gguf"
    not_gguf.write_bytes(b"<html>not found</html>")
    with pytest.raises(ConfigError) as caught:
        _run(workspace, tmp_path, name="x3", variant="tiny-ayane", lora_only=True,
             base_gguf=str(not_gguf))
    assert "not a GGUF file" in _one_line(str(caught.value))
    with pytest.raises(ConfigError) as caught:
        _run(workspace, tmp_path, name="x4", variant="tiny-ayane", lora_only=True,
             base_gguf="models/missing.gguf")
    assert "not found" in _one_line(str(caught.value))
    assert not (tmp_path / "home" / "exports").exists()
    assert not (tmp_path / "home" / "models").exists()
