"""The acceptance flow on real weights, for one device: the embedded Gemma 3 270M dequantised
to an HF folder (as the quick-start does), chat through the hf backend, the quick-start's
train job for a few steps (LoRA, and QLoRA on CUDA), its adapter exported to a GGUF LoRA
(the export job `make ayane-adapter` runs), chat with that GGUF, an eval job judged by a
local llama.cpp server, and one evolve generation judged by it.

Every job is the project's own config (configs/jobs/quickstart-ayane-270m.yaml,
export-ayane-270m-lora.yaml, the evolve and eval schemas) run through the job runner
(`python -m pipelines run`, as the console and `make ayane-adapter` start them); only the
device and the step counts differ between `SETTINGS["cuda"]` (tests/gpu on a GPU,
bench/gpu/acceptance.sh) and `SETTINGS["cpu"]` (the same tests as a CPU dry run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
BASE_HF = "accept-hf"          # the dequantised 270M as an hf variant on the flow's device
BASE_GGUF = "accept-gguf"      # the packaged Q4_K_M as a gguf variant on the flow's device
JUDGE = "accept-judge"         # the local llama.cpp server, as an OpenAI-compatible judge
QUESTION = "はじめまして。お名前と、好きなものを教えてください。"
GiB = 1024**3


@dataclass(frozen=True)
class Settings:
    """What differs between the GPU acceptance run and the CPU dry run: the device and how
    much work each stage does (the CPU one is sized to prove the path, not to measure)."""

    device: str                 # cuda | cpu
    train_steps: int
    batch_size: int
    eval_questions: int         # the train job's mini-evaluation
    chat_tokens: int            # per chat reply (the tokens/s figures)
    eval_limits: dict[str, int] = field(default_factory=dict)
    eval_max_new_tokens: int = 48
    judge_max_tokens: int = 256
    judge_few_shot: int = 1
    evolve_population: int = 4
    evolve_questions: int = 4
    evolve_max_new_tokens: int = 32

    @property
    def n_gpu_layers(self) -> int | None:
        """Every layer on the GPU; on the CPU the variant leaves it to the build (none)."""
        return -1 if self.device == "cuda" else None


SETTINGS = {
    "cuda": Settings("cuda", train_steps=30, batch_size=8, eval_questions=8, chat_tokens=128,
                     eval_limits={"heldout": 4, "probes": 2}, eval_max_new_tokens=48,
                     judge_max_tokens=256, evolve_population=4, evolve_questions=4,
                     evolve_max_new_tokens=32),
    "cpu": Settings("cpu", train_steps=2, batch_size=4, eval_questions=2, chat_tokens=24,
                    eval_limits={"heldout": 2, "probes": 0}, eval_max_new_tokens=16,
                    judge_max_tokens=48, judge_few_shot=0, evolve_population=2,
                    evolve_questions=1, evolve_max_new_tokens=8),
}


def tools_cache() -> Path:
    """llama.cpp's converters, fetched once and shared with tests/export (KYARA_TEST_TOOLS)."""
    return Path(os.environ.get("KYARA_TEST_TOOLS", Path.home() / ".cache" / "kyara-test-tools"))


@dataclass
class Chat:
    """One reply and how it was made."""

    text: str
    stop_reason: str | None
    tokens: int
    tokens_per_s: float | None
    settings: dict[str, Any] = field(default_factory=dict)  # gguf: threads and GPU layers
    gpu_bytes_loaded: int | None = None  # CUDA: device memory the model took when loaded
    device: str | None = None  # hf: where the model runs


@dataclass
class JobRun:
    name: str
    events: list[Any]
    returncode: int
    seconds: float

    @property
    def last(self) -> Any:
        return self.events[-1] if self.events else None

    @property
    def summary(self) -> dict[str, Any]:
        return (self.last.summary or {}) if self.last is not None else {}

    def metrics(self, *names: str) -> list[float]:
        return [e.value for e in self.events if e.type == "metric" and e.name in names]


class Flow:
    """A configs/ tree and a kyara home for one device. The configs are the repository's,
    plus the two base variants on this device and the judge on the local server."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = Path(root)
        self.s = settings
        self.configs = self.root / "configs"
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copytree(CONFIGS, self.configs, dirs_exist_ok=True)
        app = yaml.safe_load((CONFIGS / "kyara.yaml").read_text(encoding="utf-8"))
        app.update(home=str(self.home), llama_cpp_dir=str(self.converters()))
        self._write(self.configs / "kyara.yaml", app)
        hf = yaml.safe_load((CONFIGS / "models" / "gemma3-270m-hf.yaml").read_text("utf-8"))
        hf.update(name=BASE_HF, device=settings.device, persona="ayane",
                  description=f"Gemma 3 270M (dequantised) on {settings.device}")
        self._write(self.configs / "models" / f"{BASE_HF}.yaml", hf)
        gguf = yaml.safe_load((CONFIGS / "models" / "gemma3-270m.yaml").read_text("utf-8"))
        gguf.update(name=BASE_GGUF, persona="ayane",
                    description=f"Gemma 3 270M Q4_K_M on {settings.device}")
        if settings.n_gpu_layers is not None:
            gguf["n_gpu_layers"] = settings.n_gpu_layers
        self._write(self.configs / "models" / f"{BASE_GGUF}.yaml", gguf)

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False),
                        encoding="utf-8")

    @staticmethod
    def converters() -> Path:
        from pipelines.export.tools import converter_dir

        return converter_dir(tools_cache())

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KYARA_HOME": str(self.home), "KYARA_CONFIGS": str(self.configs),
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def workspace(self):
        from pipelines.workspace import Workspace

        return Workspace.load(self.configs)

    def variant(self, name: str, **changes: Any):
        variant = self.workspace().variant(name)
        return variant.model_copy(update=changes) if changes else variant

    # --- the base model -------------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        return self.home / "models" / "gemma-3-270m-hf"

    def dequantise(self) -> float:
        """The embedded GGUF as an HF folder (what `dequantize_from: gemma3-270m` does in
        the quick-start); seconds it took (0 when it was there)."""
        from pipelines.inference.dequantize import dequantize_gguf, dequantized_ready
        from pipelines.inference.embedded import ensure_embedded

        if dequantized_ready(self.base_dir):
            return 0.0
        started = time.perf_counter()
        dequantize_gguf(ensure_embedded("gemma3-270m", self.home), self.base_dir)
        return time.perf_counter() - started

    # --- chat -----------------------------------------------------------------------------

    def chat(self, variant: Any, question: str = QUESTION) -> Chat:
        """One reply from the variant's backend, in this process (as a job loads it):
        sampled at its temperature with a fixed seed, the flow's token budget."""
        from pipelines.inference.base import GenerationOptions
        from pipelines.inference.registry import load_backend

        before = _gpu_free() if self.s.device == "cuda" else None
        backend = load_backend(variant, self.home)
        try:
            loaded = (before - _gpu_free()) if before is not None else None
            system = self.workspace().persona("ayane").prompts.system
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": question}]
            options = GenerationOptions.from_config(variant.generation, seed=0,
                                                    max_new_tokens=self.s.chat_tokens)
            text, final = "", None
            for delta in backend.stream(messages, options):
                if delta.done:
                    final = delta
                else:
                    text += delta.text
            assert final is not None, "the stream ended without a final delta"
            return Chat(text=text, stop_reason=final.stop_reason,
                        tokens=final.completion_tokens or 0, tokens_per_s=final.tokens_per_s,
                        settings=dict(getattr(backend, "settings", {}) or {}),
                        gpu_bytes_loaded=loaded, device=getattr(backend, "device", None))
        finally:
            backend.close()

    # --- jobs through the runner ----------------------------------------------------------

    def run_job(self, cfg: dict[str, Any], timeout: float = 900) -> JobRun:
        """The job through the runner in its own process, as the console starts it; its
        events from events.jsonl (the runner's whole interface)."""
        from pipelines.events import EVENTS_FILE, iter_events

        path = self.configs / "jobs" / f"{cfg['name']}.yaml"
        self._write(path, cfg)
        run_dir = self.home / "runs" / f"{cfg['name']}-{time.strftime('%H%M%S')}"
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipelines", "run", str(path),
                               "--run-dir", str(run_dir), "--configs", str(self.configs)],
                              cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        seconds = time.perf_counter() - started
        events = list(iter_events(run_dir / EVENTS_FILE)) if (run_dir / EVENTS_FILE).exists() \
            else []
        if not events:
            raise AssertionError(f"{cfg['name']}: no events (exit {proc.returncode}): "
                                 f"{proc.stderr[-3000:]}")
        return JobRun(cfg["name"], events, proc.returncode, seconds)

    def train_job(self, name: str, qlora: bool = False) -> dict[str, Any]:
        """The CPU quick-start's job, on the flow's base variant, for a few steps."""
        cfg = yaml.safe_load((CONFIGS / "jobs" / "quickstart-ayane-270m.yaml").read_text("utf-8"))
        cfg.update(name=name, variant=name, base=BASE_HF, qlora=qlora,
                   max_steps=self.s.train_steps, batch_size=self.s.batch_size,
                   save_steps=max(1, self.s.train_steps), logging_steps=1,
                   eval_questions=self.s.eval_questions,
                   eval_max_new_tokens=self.s.eval_max_new_tokens)
        return cfg

    def train(self, name: str, qlora: bool = False) -> JobRun:
        return self.run_job(self.train_job(name, qlora))

    def export(self, trained: str) -> JobRun:
        """The trained variant's adapter as a GGUF LoRA on the packaged Q4_K_M base, verified
        there: export-ayane-270m-lora.yaml with `base_gguf`, as `make ayane-adapter` runs it."""
        cfg = yaml.safe_load((CONFIGS / "jobs" / "export-ayane-270m-lora.yaml").read_text("utf-8"))
        cfg.update(name=f"{trained}-gguf", variant=trained, base_gguf="gemma3-270m",
                   output=str(self.home / "exports" / f"{trained}-gguf"), force=True)
        return self.run_job(cfg)

    def eval(self, variants: list[str]) -> JobRun:
        """A small eval job: the variants, retrieval off, judged on one criterion and
        pairwise by the local server (the judge file written by `judge_on`)."""
        sets = [k for k, n in self.s.eval_limits.items() if n > 0]
        cfg = {"job": "eval", "name": f"accept-eval-{self.s.device}", "persona": "ayane",
               "variants": variants, "rag": [False], "sets": sets,
               "limits": {k: n for k, n in self.s.eval_limits.items() if n > 0},
               "max_new_tokens": self.s.eval_max_new_tokens, "judge": JUDGE,
               "criteria": ["personality"], "probe_criteria": [],
               "pairwise_criteria": ["personality"], "reference": variants[0]}
        return self.run_job(cfg)

    def evolve(self, models: list[Path]) -> JobRun:
        """One generation of the evolve job over the given model folders, judged locally."""
        cfg = {"job": "evolve", "name": f"accept-evolve-{self.s.device}", "persona": "ayane",
               "method": "linear", "models": [str(m) for m in models], "judge": JUDGE,
               "criteria": ["personality"], "population": self.s.evolve_population,
               "generations": 1, "sigma": 0.2, "seed": 0,
               "options": {"device": self.s.device},
               "questions_limit": self.s.evolve_questions,
               "max_new_tokens": self.s.evolve_max_new_tokens,
               "batch_size": self.s.evolve_questions, "samples": 1,
               "output": str(self.home / "evolve" / f"accept-evolve-{self.s.device}")}
        return self.run_job(cfg)

    def merged(self, adapter: Path) -> Path:
        """The base with the trained LoRA merged in (PEFT), a second whole model for evolve."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        out = self.home / "models" / "accept-merged"
        if (out / "config.json").is_file():
            return out
        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.base_dir).save_pretrained(out)
        return out

    # --- the judge: llama.cpp's own server ------------------------------------------------

    @contextmanager
    def judge_server(self, model: Path) -> Iterator[str]:
        """llama_cpp.server on 127.0.0.1 with `model`, every layer on the GPU on CUDA; yields
        its base URL and writes the judge file that names it."""
        from tests.test_llama_server import free_port

        port = free_port()
        log_path = self.home / "logs" / "judge-server.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        layers = "-1" if self.s.device == "cuda" else "0"
        threads = str(len(os.sched_getaffinity(0)))  # the server's default is half the cores
        with open(log_path, "wb") as log:  # a file: llama.cpp's logs would fill a pipe
            proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
                 "--chat_format", "gemma", "--model_alias", "judge",
                 "--n_gpu_layers", layers, "--n_threads", threads,
                 "--n_threads_batch", threads], stdout=log, stderr=subprocess.STDOUT,
                env=self.env)
            base = f"http://127.0.0.1:{port}/v1"
            try:
                _wait_for(base, proc, log_path)
                self._write(self.configs / "judges" / f"{JUDGE}.yaml", {
                    "name": JUDGE, "provider": "openai_compatible", "model": "judge",
                    "base_url": base, "api_key_env": None, "criteria": ["personality"],
                    "few_shot": self.s.judge_few_shot, "concurrency": 1, "timeout_s": 300,
                    "max_retries": 0, "temperature": 0.0,
                    # llama_cpp.server computes top logprobs in Python over the vocabulary
                    "logprobs": False, "max_tokens": self.s.judge_max_tokens})
                yield base
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_for(base: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"llama_cpp.server did not come up: "
                         f"{log.read_text(errors='replace')[-2000:]}")


def _gpu_free() -> int:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return int(free)


def write_figures(path: Path, figures: dict[str, Any]) -> None:
    """Merge `figures` (per device) into the JSON file bench/gpu/acceptance.sh prints."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for device, values in figures.items():
        data.setdefault(device, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
