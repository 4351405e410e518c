"""The tiny tokenizer and models of tests/inference (built once per session, no hub)."""

from tests.inference.conftest import (  # noqa: F401  (fixtures, used by name)
    adapter_dir,
    gemma_dir,
    llama_dir,
    tokenizer_dir,
)
