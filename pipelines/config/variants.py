"""Model variants (configs/models/*.yaml): one schema per `backend:`, told apart by that
key (a pydantic discriminated union)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter, model_validator

from pipelines.config.base import Name, Strict
from pipelines.config.readers import read_yaml, validate_tagged


class Generation(Strict):
    """Sampling settings of a reply."""

    max_new_tokens: int = Field(96, gt=0, description="the longest reply, in tokens")
    temperature: float = Field(0.7, ge=0, description="0: greedy")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: the probability "
                         "mass kept")
    top_k: int = Field(64, ge=0, description="the most likely tokens kept; 0: all")
    repeat_penalty: float = Field(1.0, gt=0, description="1.0: none")
    seed: int | None = Field(None, description="sampling seed; unset: not seeded")


class _VariantBase(Strict):
    name: Name = Field(description="how chat, jobs and the store name it")
    description: str = Field("", description="a note on what it is, for whoever reads the file")
    persona: str | None = Field(None, description="the persona it was made for; unset: the "
                                "default persona")
    generation: Generation = Field(Generation(), description="sampling settings")


class HFVariant(_VariantBase):
    backend: Literal["hf"] = Field(description="transformers, in process or in a worker")
    model: str = Field(description="a local directory or a Hugging Face model id")
    adapter: str | None = Field(None, description="a PEFT LoRA adapter directory")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="weights' dtype; auto: the model's own")
    attn_implementation: Literal["eager", "sdpa"] | None = Field(
        None, description="attention kernel; unset: the loader's choice (eager for Gemma)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when "
                                                   "available")
    load_in_4bit: bool = Field(False, description="bitsandbytes 4-bit weights (CUDA)")
    n_threads: int | None = Field(
        None, gt=0, description="torch threads on the CPU; unset: every core this process may use"
    )


class GGUFVariant(_VariantBase):
    backend: Literal["gguf"] = Field(description="llama.cpp through llama-cpp-python")
    path: str | None = Field(None, description="a .gguf file")
    embedded: Literal["gemma3-270m"] | None = Field(
        None, description="a GGUF carried by a Python package (assembled on first use)"
    )
    lora_path: str | None = Field(None, description="a GGUF LoRA adapter file")
    chat_template: str | None = Field(
        None, description="a named template (gemma), a .jinja file, or inline Jinja"
    )
    n_gpu_layers: int | None = Field(
        None, description="layers on the GPU; unset: all when llama.cpp was built with GPU "
        "offload, else 0"
    )
    n_ctx: int = Field(2048, gt=0, description="context window, in tokens")
    n_threads: int | None = Field(
        None, gt=0, description="decode threads; unset: every core this process may use"
    )

    @model_validator(mode="after")
    def _one_source(self) -> GGUFVariant:
        if (self.path is None) == (self.embedded is None):
            raise ValueError("set exactly one of 'path' and 'embedded'")
        return self


class OpenAIVariant(_VariantBase):
    backend: Literal["openai"] = Field(description="an OpenAI-compatible chat API over HTTP")
    model: str = Field(description="the model name at the server")
    base_url: str | None = Field(None, description="the server's /v1 URL; unset: OpenAI's")
    api_key_env: str = Field("OPENAI_API_KEY", description="the environment variable "
                             "holding the API key")
    timeout_s: float = Field(60, gt=0, description="seconds to wait for the server")
    system_prompt: Literal["auto", "fold", "native"] = Field(
        "auto", description="fold: the system text goes into the first user turn, as the hf "
        "and gguf backends do for templates without a system role (Gemma 2 served by vLLM or "
        "llama.cpp); native: sent as a system message; auto: native until the server refuses "
        "the system role, then folded (retried once, remembered)")


# A new backend: its class here, in this union; VARIANT_BACKENDS follows from it.
Variant = Annotated[Union[HFVariant, GGUFVariant, OpenAIVariant], Field(discriminator="backend")]
VARIANT_BACKENDS: dict[str, type[BaseModel]] = {
    kind.model_fields["backend"].annotation.__args__[0]: kind
    for kind in Variant.__origin__.__args__
}
_VARIANT = TypeAdapter(Variant)


def parse_variant(data: Any, source: str) -> Variant:
    return validate_tagged(data, _VARIANT, "backend", VARIANT_BACKENDS, source)


# A variant's file paths that start with ./ or ../ are taken from the YAML file's folder
# (a shipped adapter beside its config); other relative paths from the kyara home.
_VARIANT_PATH_FIELDS = ("path", "lora_path", "model", "adapter", "chat_template")


def load_variant(path: str | Path) -> Variant:
    path = Path(path)
    variant = parse_variant(read_yaml(path), str(path))
    for field in _VARIANT_PATH_FIELDS:
        value = getattr(variant, field, None)
        if isinstance(value, str) and value.startswith(("./", "../")):
            setattr(variant, field, str((path.parent / value).resolve()))
    return variant
