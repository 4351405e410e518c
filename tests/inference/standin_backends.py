"""Stand-in ChatBackends for the worker-process tests, put behind a real variant with
`KYARA_BACKEND_MODULES="gguf=tests.inference.standin_backends:CrashBackend"` (the worker
processes the console starts read it too).

CrashBackend answers like a model, a character at a time; a question containing `crash`
makes it stream a few characters and then crash natively (a NULL read: SIGSEGV), one
containing `abort` calls os.abort() (SIGABRT) the same way; with KYARA_STANDIN_CRASH=1
every question crashes (for `kyara doctor`, whose question is fixed); KYARA_STANDIN_REPLY
replaces the reply's text."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines.inference.base import Delta, GenerationOptions

REPLY = "ごきげんよう、絢音ですわ。"
PARTIAL = "ごきげん"  # what streams before a crash


class CrashBackend:
    def __init__(self, variant: Any, home: Path | None = None) -> None:
        self.variant = variant
        self.name = variant.name
        self.last: Delta | None = None
        self.settings = {"n_threads": 1, "n_threads_source": "stand-in", "n_gpu_layers": 0,
                         "n_gpu_layers_source": "stand-in", "gpu_offload": False}

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        time.sleep(float(os.environ.get("KYARA_STANDIN_RENDER_SLEEP", "0")))  # a hung render
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<model>"

    def stream(self, messages: Sequence[dict[str, Any]], options: GenerationOptions
               ) -> Iterator[Delta]:
        question = messages[-1]["content"]
        if os.environ.get("KYARA_STANDIN_CRASH") == "1":
            question += " crash"
        started = time.perf_counter()
        sent: list[str] = []
        delay = float(os.environ.get("KYARA_STANDIN_DELAY", "0.01"))
        try:
            reply = os.environ.get("KYARA_STANDIN_REPLY", REPLY)  # a hostile reply, say
            for char in reply[: options.max_new_tokens]:
                if "".join(sent) == PARTIAL and ("crash" in question or "abort" in question):
                    time.sleep(0.2)  # let the partial reply reach the consumer first
                    if "abort" in question:
                        os.abort()
                    ctypes.string_at(0)  # SIGSEGV: a native crash, as llama.cpp's AMX path
                time.sleep(delay)
                sent.append(char)
                yield Delta(text=char)
        except GeneratorExit:
            self.last = Delta(done=True, stop_reason="cancel", completion_tokens=len(sent))
            raise
        self.last = Delta(done=True, stop_reason="eos", stop_token="<end_of_turn>",
                          prompt_tokens=len(question), completion_tokens=len(sent),
                          ttft_s=0.001, tokens_per_s=100.0,
                          extra={"pid": os.getpid(), "elapsed": time.perf_counter() - started})
        yield self.last

    def close(self) -> None:
        pass


ENV = {"KYARA_BACKEND_MODULES": "gguf=tests.inference.standin_backends:CrashBackend"}


def write_standin_variant(configs: Path, folder: Path, name: str = "standin") -> Path:
    """configs/models/<name>.yaml: a gguf variant on a placeholder file, which the stand-in
    serves under ENV."""
    model = folder / f"{name}.gguf"
    model.write_bytes(b"GGUF")
    path = configs / "models" / f"{name}.yaml"
    path.write_text(f"name: {name}\nbackend: gguf\npath: {model}\nchat_template: gemma\n",
                    encoding="utf-8")
    return path


def standin_variant(folder: Path, name: str = "standin") -> Any:
    from pipelines.config import load_variant

    (folder / "models").mkdir(parents=True, exist_ok=True)
    return load_variant(write_standin_variant(folder, folder, name))
