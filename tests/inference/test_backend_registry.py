"""The registry: lazy imports, one class per backend, missing files named before loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import GGUFVariant, HFVariant, load_variant
from pipelines.inference.base import BackendError, ChatBackend, GenerationOptions
from pipelines.inference.registry import BACKENDS, backend_class, load_backend

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_registry_loads_no_model_library():
    code = (
        "import sys, pipelines.inference.registry, pipelines.inference.embedded; "
        "print(sorted(m for m in ('torch', 'llama_cpp', 'transformers', 'openai') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "[]"


def test_every_backend_name_has_its_class():
    from pipelines.inference.gguf import GGUFBackend
    from pipelines.inference.hf import HFBackend
    from pipelines.inference.openai_backend import OpenAIBackend

    assert set(BACKENDS) == {"hf", "gguf", "openai"}
    assert backend_class("hf") is HFBackend
    assert backend_class("gguf") is GGUFBackend
    assert backend_class("openai") is OpenAIBackend


def test_unknown_backend_is_an_error(one_line):
    with pytest.raises(BackendError) as err:
        backend_class("vllm")
    assert "hf, gguf, openai" in one_line(str(err.value))


@pytest.mark.parametrize(
    "variant, missing",
    [
        (GGUFVariant(name="lost", backend="gguf", path="models/lost.gguf"), "models/lost.gguf"),
        (HFVariant(name="lost", backend="hf", model="./checkpoints/lost"), "checkpoints/lost"),
    ],
)
def test_missing_model_path_names_the_path_and_the_variant(variant, missing, tmp_path, one_line):
    with pytest.raises(BackendError) as err:
        load_backend(variant, tmp_path)
    message = one_line(str(err.value))
    assert "'lost'" in message and missing in message


def test_missing_adapter_is_named_before_any_model_loads(tmp_path, gemma_dir, one_line):
    variant = HFVariant(name="tuned", backend="hf", model=str(gemma_dir), adapter="runs/x/adapter")
    with pytest.raises(BackendError) as err:
        load_backend(variant, tmp_path)
    assert str(tmp_path / "runs/x/adapter") in one_line(str(err.value))


def test_the_shipped_default_variant_loads_and_answers(embedded_gguf):
    variant = load_variant(REPO / "configs" / "models" / "gemma3-270m.yaml")
    home = embedded_gguf.parents[1]  # already assembled there
    backend = load_backend(variant, home)
    try:
        assert isinstance(backend, ChatBackend)
        assert backend.model_path == embedded_gguf
        assert backend.render([{"role": "user", "content": "やあ"}]) == (
            "<bos><start_of_turn>user\nやあ<end_of_turn>\n<start_of_turn>model\n"
        )
        final = list(
            backend.stream(
                [{"role": "user", "content": "やあ"}],
                GenerationOptions(max_new_tokens=3, temperature=0),
            )
        )[-1]
        assert final.done and final.completion_tokens == 3
    finally:
        backend.close()
