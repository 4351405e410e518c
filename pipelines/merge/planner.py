"""Memory planner: predicted peak GPU memory and host RAM of a merge, evolve, train or eval
job, from the models' config.json and safetensors headers only (no weights are loaded, no
torch import), compared with the device's budget. A train job's plan is the job's own
memory model (pipelines/training/memory.py) on the job's data, read with the base model's
tokenizer: `kyara plan` shows the number the job refuses on.

A plan is a list of named terms per place (gpu / host). When a place is over budget the
plan names its largest term and what to change so it fits: naming the term is the point —
"out of memory" alone does not tell the user which knob to turn.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.training import memory
from pipelines.training.memory import ModelShape

GiB = 1024**3
MiB = 1024**2

DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
TORCH_DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8,
    "int8": 1, "uint8": 1,
}

# Measured here (Python 3.11, torch 2.13 CPU, transformers 5, mergekit 0.1.5): the RSS of a
# process that has imported mergekit and run a tiny merge. Everything else scales with the
# models.
RUNTIME_MERGE = 420 * MiB
RUNTIME_TORCH = 450 * MiB     # a job that imports torch + transformers (train, eval, evolve)
CUDA_CONTEXT = 600 * MiB      # CUDA context + cuBLAS workspace, per process
PROMPT_TOKENS = 1024          # generation: prompt budget assumed besides max_new_tokens
MERGE_CHUNK_ELEMENTS = 1024**2  # in-memory evolve merge: elements per row chunk


def parse_size(text: str | int | float) -> int:
    """'24GiB', '1GB', '500M', '5B' (mergekit's shard notation: billions of bytes) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.I)
    if not match:
        raise ConfigError(f"size: expected a number with a unit such as 24GiB or 500MB, "
                          f"found {text!r}")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    if str(text).strip().upper().endswith("B") and not unit and number < 1e4:
        unit = "G"  # mergekit writes "5B" for five billion bytes
    power = " KMGT".index(unit or " ")
    return int(number * (1024 if binary else 1000) ** power)


def human(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------
# What a model folder holds, from its headers


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: 8 bytes little-endian length, then JSON."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * MiB:
            raise ConfigError(f"{path}: not a safetensors file (header length {length})")
        try:
            return json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path}: not a safetensors file (header is not JSON)") from None


@dataclass
class ModelStats:
    path: Path
    params: int
    bytes: int                  # weights as stored
    shard_bytes: list[int]      # file size of each shard
    largest_tensor: int         # elements of the largest tensor
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype_bytes(self) -> float:
        return self.bytes / self.params if self.params else 2.0

    def get(self, *keys: str, default: Any = None) -> Any:
        """A config value, looking into text_config for multimodal configs."""
        for source in (self.config, self.config.get("text_config") or {}):
            for key in keys:
                if source.get(key) is not None:
                    return source[key]
        return default

    @property
    def layers(self) -> int:
        return int(self.get("num_hidden_layers", "n_layer", "num_layers", default=0))

    @property
    def hidden(self) -> int:
        return int(self.get("hidden_size", "n_embd", "d_model", default=0))

    @property
    def heads(self) -> int:
        return int(self.get("num_attention_heads", "n_head", default=1))

    @property
    def kv_heads(self) -> int:
        return int(self.get("num_key_value_heads", default=self.heads))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=(self.hidden // max(self.heads, 1)) or 64))

    @property
    def vocab(self) -> int:
        return int(self.get("vocab_size", default=32000))

    @property
    def intermediate(self) -> int:
        return int(self.get("intermediate_size", default=4 * self.hidden))


def resolve_model_dir(ref: str, base: Path | None = None) -> Path:
    """A local folder, else a Hugging Face id already in the local cache (never fetched)."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and base is not None and (base / path).is_dir():
        path = base / path
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:
        raise ConfigError(f"model '{ref}': not a local folder and not in the Hugging Face "
                          "cache; the planner reads headers only and does not download") from None


def inspect_model(ref: str | Path, base: Path | None = None) -> ModelStats:
    """Parameter count, stored bytes and shard sizes from the safetensors headers."""
    path = resolve_model_dir(str(ref), base)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no .safetensors files (the planner reads their headers)")
    params = stored = largest = 0
    for file in files:
        for name, info in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            params += count
            largest = max(largest, count)
            start, end = info["data_offsets"]
            stored += int(end) - int(start)
    config: dict[str, Any] = {}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return ModelStats(path=path, params=params, bytes=stored,
                      shard_bytes=[f.stat().st_size for f in files], largest_tensor=largest,
                      config=config)


# --------------------------------------------------------------------------------------
# Plans


@dataclass
class Term:
    name: str
    bytes: int
    note: str = ""
    floor: int | None = None  # what the term shrinks to with its remedy; None: fixed


@dataclass
class Budget:
    gpu: int | None     # None: no GPU
    host: int
    source: str         # "detected" or "given"


@dataclass
class Plan:
    job: str
    device: str                              # where the heavy work runs: cpu | cuda
    gpu: list[Term] = field(default_factory=list)
    host: list[Term] = field(default_factory=list)
    budget: Budget | None = None
    # per place, what to change when that place is over budget, keyed by term name
    remedies: dict[str, Any] = field(default_factory=dict)  # text, or f(room) -> text
    notes: list[str] = field(default_factory=list)
    margin: float = 1.0  # the share of each budget the job may use (train: memory.MARGIN)

    @property
    def gpu_peak(self) -> int:
        return sum(t.bytes for t in self.gpu)

    @property
    def host_peak(self) -> int:
        return sum(t.bytes for t in self.host)

    def over(self) -> list[tuple[str, int, int]]:
        """(place, peak, budget) for each place over its budget."""
        if self.budget is None:
            return []
        found = []
        if self.gpu:
            if self.budget.gpu is None:
                found.append(("gpu", self.gpu_peak, 0))
            elif self.gpu_peak > self.usable(self.budget.gpu):
                found.append(("gpu", self.gpu_peak, self.usable(self.budget.gpu)))
        if self.host_peak > self.usable(self.budget.host):
            found.append(("host", self.host_peak, self.usable(self.budget.host)))
        return found

    def usable(self, limit: int) -> int:
        return int(limit * self.margin)

    @property
    def fits(self) -> bool:
        return not self.over()

    def breaking_term(self, place: str) -> Term:
        terms = self.gpu if place == "gpu" else self.host
        return max(terms, key=lambda t: t.bytes)

    def fixing_term(self, place: str, peak: int, limit: int) -> tuple[Term, bool]:
        """The term whose remedy alone brings `place` under `limit` (the largest saving
        first), else the largest term."""
        terms = self.gpu if place == "gpu" else self.host
        for term in sorted(terms, key=lambda t: t.bytes - (t.floor or t.bytes), reverse=True):
            if term.floor is not None and peak - term.bytes + term.floor <= limit:
                return term, True
        return self.breaking_term(place), False

    def verdict(self) -> str:
        """One line: fits, or which term breaks which budget and what would fit."""
        problems = self.over()
        if not problems:
            return (f"fits: GPU {human(self.gpu_peak)}, host {human(self.host_peak)}"
                    if self.gpu else f"fits: host {human(self.host_peak)}")
        parts = []
        for place, peak, limit in problems:
            if place == "gpu" and self.budget and self.budget.gpu is None:
                parts.append(f"needs a GPU ({human(peak)}) and none was found; "
                             f"{self.remedies.get('no_gpu', 'run it on a GPU machine')}")
                continue
            term, fits = self.fixing_term(place, peak, limit)
            fix = self.remedies.get(term.name) or ""
            if callable(fix):
                fix = fix(limit - (peak - term.bytes))
            fix = fix if fits else f"no single change fits; {fix}" if fix else ""
            parts.append(f"{place} peak {human(peak)} > {human(limit)}: term "
                         f"'{term.name}' {human(term.bytes)}" + (f"; {fix}" if fix else ""))
        return "does not fit: " + " | ".join(parts)

    def events(self) -> Iterator[Any]:
        """The plan as a job's events: its lines as logs, the predicted peaks as metrics."""
        from pipelines import events as ev

        for line in self.lines():
            yield ev.log(line)
        yield ev.metric("predicted_host_bytes", self.host_peak, stage="plan")
        if self.gpu:
            yield ev.metric("predicted_gpu_bytes", self.gpu_peak, stage="plan")

    def lines(self) -> list[str]:
        out = [f"{self.job} on {self.device}"]
        for place, terms, peak, limit in (
            ("GPU", self.gpu, self.gpu_peak, self.budget.gpu if self.budget else None),
            ("host", self.host, self.host_peak, self.budget.host if self.budget else None),
        ):
            if not terms:
                continue
            where = f" of {human(limit)}" if limit else ""
            if limit and self.margin < 1:
                where += f" ({self.margin:.0%} usable: {human(self.usable(limit))})"
            out.append(f"{place} peak {human(peak)}{where}")
            out.extend(f"  {t.name:<28} {human(t.bytes):>11}  {t.note}" for t in terms)
        out.extend(f"note: {n}" for n in self.notes)
        out.append(self.verdict())
        return out


def detect_budget(gpu_mem: str | int | None = None, ram: str | int | None = None) -> Budget:
    """The numbers given, else the free GPU memory (CUDA) and the available host RAM."""
    gpu: int | None = parse_size(gpu_mem) if gpu_mem is not None else None
    host: int | None = parse_size(ram) if ram is not None else None
    if gpu is None:
        try:
            import torch  # only for the detection; planning itself never needs it

            if torch.cuda.is_available():
                gpu = int(torch.cuda.mem_get_info()[0])
        except Exception:
            gpu = None
    if host is None:
        host = _available_ram()
    given = "given" if gpu_mem is not None or ram is not None else "detected"
    return Budget(gpu=gpu, host=host, source=given)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


# --------------------------------------------------------------------------------------
# Merge


def merge_models(merge: dict[str, Any]) -> tuple[list[str], str | None]:
    """Every model a mergekit configuration reads (models:, slices:, base_model)."""
    refs: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, dict):
            value = value.get("model")
        if isinstance(value, str) and value not in refs:
            refs.append(value)

    for item in merge.get("models") or []:
        add(item.get("model") if isinstance(item, dict) else item)
    for sl in merge.get("slices") or []:
        for src in (sl or {}).get("sources") or []:
            add(src.get("model"))
    base = merge.get("base_model")
    if base:
        add(base)
    return refs, base if isinstance(base, str) else None


def plan_merge(merge: dict[str, Any], options: Any, base_dir: Path | None = None) -> Plan:
    """A mergekit run: sources are read through memory maps (one open shard per model, its
    touched pages counted in RSS), the writer buffers up to out_shard_size of output, and a
    few tensors are live per step (the inputs of one output tensor plus the result)."""
    refs, _ = merge_models(merge)
    if not refs:
        raise ConfigError("merge: names no models (models:, slices: or base_model:)")
    stats = [inspect_model(r, base_dir) for r in refs]
    device = getattr(options, "device", "cpu") or "cpu"
    out_dtype = merge.get("out_dtype") or getattr(options, "dtype", None) or merge.get("dtype")
    first = stats[0]
    out_bpp = TORCH_DTYPE_BYTES.get(str(out_dtype), first.dtype_bytes)
    math_bpp = TORCH_DTYPE_BYTES.get(str(merge.get("dtype")), first.dtype_bytes)
    output = int(first.params * out_bpp)
    shard = parse_size(getattr(options, "out_shard_size", "5B"))
    sources = sum(max(s.shard_bytes) for s in stats)
    largest = max(s.largest_tensor for s in stats)
    working = int(largest * math_bpp * (len(stats) + 2))
    plan = Plan(job="merge", device=device)
    plan.host.append(Term("runtime", RUNTIME_MERGE, "Python, torch, mergekit"))
    plan.host.append(Term("sources (mmap)", sources,
                          f"{len(stats)} models, the largest shard of each, memory-mapped"))
    plan.host.append(Term("output shard buffer", min(shard, output),
                          f"out_shard_size {human(shard)}, output {human(output)}",
                          floor=min(64 * MiB, output)))
    if device == "cuda":
        plan.gpu.append(Term("CUDA context", CUDA_CONTEXT))
        plan.gpu.append(Term("working tensors", working,
                             f"largest tensor x {len(stats) + 2}", floor=0))
    else:
        plan.host.append(Term("working tensors", working, f"largest tensor x {len(stats) + 2}"))
    plan.remedies = {
        "output shard buffer": lambda room: "set options.out_shard_size to "
                               f"{max(int(room * 0.9) // MiB, 64)}MiB or less",
        "sources (mmap)": "re-shard the source models into smaller files (mmap pages are "
                          "file-backed: the kernel can drop them, so this term is soft)",
        "working tensors": "merge on the CPU (options.device: cpu)" if device == "cuda"
                           else "use a machine with more RAM",
        "no_gpu": "or merge on the CPU (options.device: cpu)",
        "CUDA context": "merge on the CPU (options.device: cpu)",
    }
    return plan


# --------------------------------------------------------------------------------------
# Evolve, train, eval


def _kv_cache(m: ModelStats, context: int, batch: int, bpp: float) -> int:
    return int(m.layers * 2 * m.kv_heads * m.head_dim * context * batch * bpp)


def plan_evolve(cfg: Any, base_dir: Path | None = None, context: int | None = None,
                batch: int = 8) -> Plan:
    """One resident model on the device, sources memory-mapped on the host, candidates
    merged tensor by tensor into it; generation batches on that model. With `ray` and N
    `workers` each actor is a process with its own resident model: on the CPU the host
    holds N of everything but the memory-mapped sources (shared page cache); on CUDA each
    actor has a GPU of its own (the GPU terms are per GPU) and the host N runtimes."""
    refs = list(cfg.models) + ([cfg.base_model] if cfg.base_model else [])
    stats = [inspect_model(r, base_dir) for r in refs]
    first = stats[0]
    device = cfg.options.device
    bpp = TORCH_DTYPE_BYTES.get(str(cfg.options.dtype), first.dtype_bytes)
    model = int(first.params * bpp)
    ctx = context or PROMPT_TOKENS + 256
    kv = _kv_cache(first, ctx, batch, bpp)
    # One output tensor at a time (pipelines/merge/inmemory.py): its inputs from every
    # model cast to fp32 and the fp32 result; ties / dare_ties also hold a stacked fp32
    # delta per model and a sign mask of the same size.
    # Merged in row chunks of at most MERGE_CHUNK_ELEMENTS; ties first ranks a whole
    # tensor's |delta| (one fp32 copy; on a GPU kthvalue's copy and a temporary too).
    inputs = len(refs)
    sparse = cfg.method in ("ties", "dare_ties")
    copies = inputs + 1 + (2 * inputs if sparse else 0)
    work = int(min(first.largest_tensor, MERGE_CHUNK_ELEMENTS) * 4 * copies
               + (first.largest_tensor * 4 * (3 if device == "cuda" else 1) if sparse else 0))
    plan = Plan(job="evolve", device=device)
    target = plan.gpu if device == "cuda" else plan.host
    if device == "cuda":
        plan.gpu.append(Term("CUDA context", CUDA_CONTEXT))
    target.append(Term("resident model", model, f"{first.params / 1e6:.0f}M params",
                       floor=int(first.params * 0.55)))
    target.append(Term("KV cache", kv, f"context {ctx} x batch {batch}", floor=kv // batch))
    target.append(Term("merge accumulator", work,
                       f"one chunk's inputs, fp32, x{copies}" + (" + ranking" if sparse else "")))
    plan.host.append(Term("runtime", RUNTIME_TORCH, "Python, torch, transformers"))
    actors = (cfg.workers or 1) if getattr(cfg, "ray", False) else 1
    if actors > 1:
        each = plan.host if device != "cuda" else [t for t in plan.host if t.name == "runtime"]
        for i, term in enumerate(plan.host):
            if term in each:
                plan.host[i] = Term(term.name, term.bytes * actors,
                                    f"{term.note}, x{actors} Ray actors".lstrip(", "),
                                    None if term.floor is None else term.floor * actors)
    plan.host.append(Term("sources (mmap)", sum(s.bytes for s in stats),
                          "file-backed: reclaimable, never copied"))
    plan.remedies = {"KV cache": "generate with batch 1",
                     "resident model": "evaluate in 8-bit or 4-bit, or use a bigger GPU",
                     "no_gpu": "or set options.device: cpu (slow)"}
    return plan


def model_shape(model_dir: str | Path, base_dir: Path | None = None,
                config: Any = None) -> ModelShape:
    """The shape the train memory model takes, from the safetensors headers (the exact
    parameter count); from a transformers config only where there are no local headers (a
    hub id whose weights are not downloaded yet), which `kyara plan` cannot read either."""
    try:
        return ModelShape.from_stats(inspect_model(model_dir, base_dir))
    except ConfigError:
        if config is None:
            raise
        return ModelShape.from_config(config)


def plan_train(cfg: Any, model_dir: str, base_dir: Path | None = None,
               device: str = "cuda", workspace: Any = None) -> Plan:
    """The train job's own estimate (pipelines/training/memory.py), term by term: the same
    number it refuses on. With the workspace, from the job's data as the job tokenises it;
    without, from max_seq_len (an upper bound)."""
    m = inspect_model(model_dir, base_dir)
    shape = ModelShape.from_stats(m)
    cuda = device == "cuda"
    plan = Plan(job=getattr(cfg, "job", "train"), device=device, margin=memory.MARGIN)
    if workspace is not None:
        sizes = memory.sizes_from_files(cfg, workspace, m.path)
        plan.notes.append(f"from the data: longest example {sizes.seq_len} tokens, at most "
                          f"{sizes.trained_per_example} trained")
    else:
        sizes = memory.DataSizes.bound(cfg)
        plan.notes.append(f"without the data: every example {sizes.seq_len} tokens long")
    if plan.job == "prefer":
        plan.notes.append(f"{cfg.method}: two sequences per row in every batch"
                          + ("; the reference is a frozen copy of the adapter"
                             if cfg.method in ("dpo", "kto") else ""))
    est = memory.train_estimate(cfg, shape, sizes, cuda=cuda)
    one = memory.train_estimate(cfg, shape, sizes, cuda=cuda, batch=1)
    four_bit = memory.train_estimate(cfg, shape, sizes, cuda=cuda, qlora=True)
    batch = f"batch {cfg.batch_size} x seq {sizes.seq_len}"
    target = plan.gpu if cuda else plan.host
    target.append(Term("CUDA context, allocator slack" if cuda else
                       "process (torch, tokenizer, data)", est.overhead))
    target.append(Term("weights", est.weights, ("4-bit" if cfg.qlora else "") +
                       f" {m.params / 1e6:.0f}M params",
                       floor=four_bit.weights if cuda and not cfg.qlora else None))
    target.append(Term("LoRA + AdamW state", est.adapter + est.optimizer,
                       f"{est.lora_params / 1e6:.1f}M trainable: fp32 weight, grad, m, v"))
    target.append(Term("activations", est.activations, batch, floor=one.activations))
    target.append(Term("logits", est.logits, f"vocab {m.vocab}, fp32, trained positions",
                       floor=one.logits))
    if cuda:
        plan.host.append(Term("runtime", RUNTIME_TORCH, "Python, torch, transformers, TRL"))
        plan.host.append(Term("loading copy", int(m.bytes), "weights pass through host RAM"))
    processes = getattr(cfg, "processes", 1)
    if processes > 1:
        # each process holds all of the above for its share of the batch: on CUDA one GPU
        # each (the GPU terms are per GPU), the host N runtimes; on the CPU the host N of
        # everything (the job compares one process's estimate with a 1/N share of RAM)
        plan.notes.append(f"{processes} processes: batch {cfg.batch_size // processes} each; "
                          + ("the GPU terms are per GPU" if cuda else "the host holds them all"))
        plan.host = [Term(t.name, t.bytes * processes, f"{t.note}, x{processes} processes"
                          .lstrip(", "), None if t.floor is None else t.floor * processes)
                     for t in plan.host]
    effective = cfg.grad_accum * cfg.batch_size
    plan.remedies = {
        "activations": f"batch_size 1 with grad_accum {effective}, or a shorter max_seq_len",
        "logits": f"batch_size 1 with grad_accum {effective}, or a shorter max_seq_len",
        "weights": "qlora: true (4-bit base weights)",
    }
    return plan


def plan_generate(model_dir: str, *, name: str, device: str, max_new_tokens: int,
                  dtype: str = "auto", load_in_4bit: bool = False, batch: int = 1,
                  base_dir: Path | None = None) -> Plan:
    m = inspect_model(model_dir, base_dir)
    bpp = 0.55 if load_in_4bit else TORCH_DTYPE_BYTES.get(dtype, m.dtype_bytes)
    ctx = PROMPT_TOKENS + max_new_tokens
    plan = Plan(job=f"eval {name}", device=device)
    target = plan.gpu if device == "cuda" else plan.host
    if device == "cuda":
        plan.gpu.append(Term("CUDA context", CUDA_CONTEXT))
    target.append(Term("weights", int(m.params * bpp), f"{m.params / 1e6:.0f}M params",
                       floor=None if load_in_4bit else int(m.params * 0.55)))
    target.append(Term("KV cache", _kv_cache(m, ctx, batch, 2 if bpp < 2 else bpp),
                       f"context {ctx} x batch {batch}"))
    plan.host.append(Term("runtime", RUNTIME_TORCH, "Python, torch, transformers"))
    plan.remedies = {"weights": "evaluate in 8-bit or 4-bit (load_in_4bit: true)",
                     "KV cache": "fewer max_new_tokens or a smaller batch"}
    return plan


# --------------------------------------------------------------------------------------
# Entry point


def plan_job(cfg: Any, workspace: Any = None, budget: Budget | None = None) -> list[Plan]:
    """Plans for one job config (eval: one per hf variant, run one after another)."""
    base_dir = workspace.settings.home_path() if workspace is not None else None
    kind = cfg.job
    cuda = budget is not None and budget.gpu is not None
    if kind == "merge":
        plans = [plan_merge(cfg.merge, cfg.options, base_dir)]
    elif kind == "evolve":
        plans = [plan_evolve(cfg, base_dir)]
    elif kind in ("train", "prefer"):
        if workspace is None:
            raise ConfigError(f"base: a {kind} job names a variant; the planner needs the "
                              "workspace")
        variant = workspace.variant(cfg.base)
        plans = [plan_train(cfg, getattr(variant, "model", ""), base_dir,
                            device="cuda" if cuda else "cpu", workspace=workspace)]
    elif kind == "eval":
        if workspace is None:
            raise ConfigError("variants: the planner needs the workspace to resolve them")
        plans = []
        for name in cfg.variants:
            v = workspace.variant(name)
            if v.backend != "hf":
                continue  # llama.cpp / API variants: memory is the server's business
            device = "cuda" if (v.device == "cuda" or (v.device == "auto" and cuda)) else "cpu"
            plans.append(plan_generate(v.model, name=name, device=device,
                                       max_new_tokens=v.generation.max_new_tokens,
                                       dtype=v.dtype, load_in_4bit=v.load_in_4bit,
                                       base_dir=base_dir))
    else:
        raise ConfigError(f"job: the planner knows merge, evolve, train, prefer and eval; "
                          f"found {kind!r}")
    for plan in plans:
        plan.budget = budget
    return plans
