"""How much memory a LoRA / QLoRA run needs, before loading anything, and whether the
device has it.

A rough model, on the side of too much (a refusal costs a config edit; an out-of-memory
an hour later costs the run):

- weights: parameters x bytes (fp32 4, bf16 2; QLoRA: NF4 ~0.56 with its scales for the
  layers, fp32 for the embeddings, which PEFT upcasts);
- adapter: LoRA parameters in fp32, their gradients, and AdamW's two moments;
- activations kept for the backward pass, per token and layer (no gradient
  checkpointing): the inputs of every linear layer and norm (~18 x hidden), the MLP's
  intermediate values (~4 x intermediate), and eager attention's scores and
  probabilities (2 x heads x sequence length);
- the logits of the trained positions (TRL / our loss compute only those), three copies
  (logits, softmax, gradient);
- a fixed overhead (CUDA context, allocator slack, the Python process).

This is the one memory model of a train job: the job refuses on it (`refusal`) and
`kyara plan` prints it (`pipelines/plan/train.plan_train`), from the same model files
and the same data (`data_sizes`, `sizes_from_files`); the model's shape comes from its
safetensors headers in both (`plan.model.model_shape`). Measured against it: bench/README.md
(gpu/train_gemma2_2b.py, train_throughput.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.config import fsdp_sharded

GiB = 1024 ** 3
MARGIN = 0.9  # a run must fit in this share of the free memory


@dataclass
class ModelShape:
    params: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    kv_heads: int | None = None     # None: as many as heads
    head_dim: int | None = None     # None: hidden // heads

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // max(self.heads, 1)

    @classmethod
    def from_stats(cls, stats: Any) -> ModelShape:
        """From the planner's ModelStats (safetensors headers + config.json): the exact
        parameter count, no torch."""
        return cls(stats.params, stats.hidden, stats.layers, stats.heads, stats.intermediate,
                   stats.vocab, stats.kv_heads, stats.head_dim)

    @classmethod
    def from_config(cls, config: Any, params: int | None = None) -> ModelShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = text.hidden_size
        layers = text.num_hidden_layers
        inter = getattr(text, "intermediate_size", 4 * hidden)
        vocab = text.vocab_size
        head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        if params is None:  # from the shapes: embeddings + attention + MLP per layer
            attn = hidden * head_dim * (2 * text.num_attention_heads + 2 * kv)
            params = vocab * hidden + layers * (attn + 3 * hidden * inter)
            if not getattr(text, "tie_word_embeddings", False):
                params += vocab * hidden
        return cls(params, hidden, layers, text.num_attention_heads, inter, vocab, kv, head_dim)


@dataclass
class Estimate:
    weights: int
    adapter: int        # LoRA weights + gradients (fp32)
    optimizer: int      # AdamW's two moments
    activations: int
    logits: int
    overhead: int
    lora_params: int

    @property
    def total(self) -> int:
        return (self.weights + self.adapter + self.optimizer + self.activations + self.logits
                + self.overhead)

    def describe(self) -> str:
        return (f"~{self.total / GiB:.2f} GiB (weights {self.weights / GiB:.2f}, adapter "
                f"{self.adapter / GiB:.2f}, optimizer {self.optimizer / GiB:.2f}, activations "
                f"{self.activations / GiB:.2f}, logits {self.logits / GiB:.2f}, overhead "
                f"{self.overhead / GiB:.2f})")

    def to_dict(self) -> dict[str, float]:
        data = {k: round(v / GiB, 3) for k, v in asdict(self).items() if k != "lora_params"}
        data["total"] = round(self.total / GiB, 3)
        data["lora_params"] = self.lora_params
        return data


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_params(shape: ModelShape, r: int, target: Any = "all-linear") -> int:
    """LoRA parameters: each adapted linear layer (in x out) adds r x (in + out). all-linear
    is q, k, v, o, gate, up, down; k and v as wide as the key-value heads make them."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.dim, shape.kv * shape.dim
    sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    if target is None or target == "all-linear":
        names: Sequence[str] = LORA_MODULES
    else:
        names = [target] if isinstance(target, str) else [t for t in target if t in sizes]
    return shape.layers * sum(r * sum(sizes[n]) for n in names if n in sizes)


def logits_bytes(trained_tokens: int, vocab: int) -> int:
    """The logits of the trained positions (our loss computes only those), fp32, three
    copies: logits, softmax, gradient."""
    return 3 * trained_tokens * vocab * 4


def estimate(shape: ModelShape, *, batch: int, seq_len: int, r: int, dtype_bytes: int,
             qlora: bool = False, trained_tokens: int | None = None, cuda: bool = False,
             target_modules: Any = "all-linear") -> Estimate:
    n_lora = lora_params(shape, r, target_modules)
    if qlora:
        # NF4 covers the layers' linear weights only; the embeddings stay unquantised, and
        # PEFT's prepare_model_for_kbit_training casts them (and the norms) to fp32.
        embeddings = shape.vocab * shape.hidden
        weights = (shape.params - embeddings) * 0.5625 + embeddings * 4
    else:
        weights = shape.params * dtype_bytes
    # QLoRA: PEFT keeps the norms in fp32, so part of the activations are fp32 too. 3 bytes
    # fits what was measured (H100, Gemma-2-2B shapes, batch 8: peak 13.3 GiB).
    act_bytes = 3 if qlora else dtype_bytes
    tokens = batch * seq_len
    per_token_layer = 18 * shape.hidden + 4 * shape.intermediate + 2 * shape.heads * seq_len
    activations = tokens * shape.layers * per_token_layer * act_bytes
    activations += tokens * shape.hidden * 4 * 2  # embeddings in and hidden states out
    trained = trained_tokens if trained_tokens is not None else max(1, tokens // 4)
    return Estimate(
        weights=int(weights),
        adapter=n_lora * 4 * 2,         # fp32 weights + gradients
        optimizer=n_lora * 4 * 2,       # AdamW: exp_avg, exp_avg_sq
        activations=int(activations),
        logits=logits_bytes(trained, shape.vocab),
        # CUDA: context and allocator slack. CPU: the process itself (torch, the tokenizer,
        # datasets), which the peak RSS counts: ~2 GiB measured with the 270M quick-start.
        overhead=int((1.0 if cuda else 2.0) * GiB),
        lora_params=n_lora,
    )


# --------------------------------------------------------------------------------------
# A train job: its config, its model and its data -> the estimate it runs or refuses on


@dataclass
class DataSizes:
    """What the data makes of a batch: the padded length (the longest example, at most
    max_seq_len) and the trained positions of the example with the most of them."""
    seq_len: int
    trained_per_example: int

    @classmethod
    def bound(cls, cfg: Any) -> DataSizes:
        """Without the data: every example max_seq_len long, a quarter of it trained."""
        return cls(cfg.max_seq_len, max(1, cfg.max_seq_len // 4))


def data_sizes(examples: Sequence[Any], max_seq_len: int) -> DataSizes:
    """From tokenised examples (pipelines.training.examples.Example)."""
    longest = max(len(e.input_ids) for e in examples)
    trained = max(sum(1 for x in e.labels if x != -100) for e in examples)
    return DataSizes(min(max_seq_len, longest), trained)


def _chat_format(cfg: Any, workspace: Any, model_dir: str | Path) -> tuple[Any, str, str,
                                                                          str | None]:
    """The base model's tokenizer, chat template and turn terminator, and the persona's
    system prompt when the job prepends it: what a train or prefer job tokenises with."""
    from pipelines.training.examples import load_chat_format

    fmt = load_chat_format(model_dir)
    system = workspace.persona(cfg.persona).prompts.system if cfg.system_prompt else None
    return fmt.tokenizer, fmt.template, fmt.end_text, system


def rag_bound_prompt(cfg: Any, workspace: Any) -> str:
    """With `rag_share`, a bound on the system prompt before retrieval has run (the plan
    opens no index): the persona's retrieval prompt carrying its `rag_k` longest facts,
    as if every example had it."""
    from pipelines.prompting import format_context, system_prompt

    persona = workspace.persona(cfg.persona)
    facts = sorted(workspace.persona_data(cfg.persona).knowledge, key=lambda f: len(f.text),
                   reverse=True)[:cfg.rag_k]
    return system_prompt(persona, format_context(facts))


def sizes_from_files(cfg: Any, workspace: Any, model_dir: str | Path) -> DataSizes:
    """The train job's data steps with the tokenizer only (no model loaded): its
    conversations, prepared as the job prepares them, with the persona's system prompt (its
    retrieval prompt's bound with `rag_share`: `rag_bound_prompt`), tokenised with the base model's chat template and truncated to max_seq_len. A prefer
    job: its preference file (or its pairs' bound), pipelines.training.preference."""
    if getattr(cfg, "job", "train") == "prefer":
        return prefer_sizes(cfg, workspace, model_dir)
    from pipelines.config import ConfigError
    from pipelines.training.data import PrepOptions, prepare, read_conversations
    from pipelines.training.examples import tokenize, with_system

    source = (Path(cfg.data) if cfg.data
              else workspace.persona_dir(cfg.persona) / "dialogues.jsonl")
    rows = read_conversations(source)
    if cfg.prep:
        rows, _ = prepare(rows, PrepOptions(max_chars=cfg.max_reply_chars))
        if not rows:
            raise ConfigError(f"{source}: no conversation is left after preparation")
    tokenizer, template, end_text, system = _chat_format(cfg, workspace, model_dir)
    if getattr(cfg, "rag_share", 0) > 0:
        system = rag_bound_prompt(cfg, workspace)
    examples = [tokenize(tokenizer, template, with_system(r["messages"], system),
                         cfg.max_seq_len, end_text) for r in rows]
    return data_sizes(examples, cfg.max_seq_len)


def prefer_sizes(cfg: Any, workspace: Any, model_dir: str | Path) -> DataSizes:
    """What `kyara plan` reads for a prefer job (memory.sizes_from_files): the preference
    file tokenised as the job tokenises it; with `pairs:`, the bound the samples can reach
    (the longest prompt + max_new_tokens + the terminator)."""
    from pipelines.training.pairs import read_prompts
    from pipelines.training.preference import encode, read_preferences

    tokenizer, template, end_text, system = _chat_format(cfg, workspace, model_dir)
    if cfg.data:
        rows = read_preferences(cfg.data, cfg.method)
        encoded = encode(rows, cfg.method, tokenizer, template, system, cfg.max_seq_len,
                         end_text)
        return data_sizes(encoded.sequences, cfg.max_seq_len)
    return pairs_sizes(cfg, tokenizer, template, end_text, system,
                       read_prompts(workspace, cfg))


def pairs_sizes(cfg: Any, tokenizer: Any, template: str, end_text: str, system: str | None,
                prompts: Sequence[dict[str, Any]]) -> DataSizes:
    """A prefer job with `pairs:` before anything is sampled (the job and `kyara plan`):
    the longest prompt plus the longest sample (max_new_tokens), its terminator and the
    template's newline."""
    from pipelines.training.preference import encode_reply

    filler = {"role": "assistant", "content": "。"}
    longest = max(encode_reply(tokenizer, template, p["prompt"], filler, system, None,
                               end_text).prompt_tokens for p in prompts)
    trained = cfg.pairs.max_new_tokens + 2
    return DataSizes(min(cfg.max_seq_len, longest + trained), trained)


def per_process_batch(cfg: Any) -> int:
    """One process's share of `batch_size` (the global batch of a step): with `processes`
    > 1 each process holds only its share, and the estimate is one process's, against one
    device (a GPU each)."""
    return max(1, cfg.batch_size // getattr(cfg, "processes", 1))


def train_estimate(cfg: Any, shape: ModelShape, sizes: DataSizes, *, cuda: bool,
                   batch: int | None = None, seq_len: int | None = None,
                   qlora: bool | None = None) -> Estimate:
    """The estimate of a train job (TrainJob); batch / seq_len / qlora: the same run with
    that one setting changed (what `suggestion` and the planner's remedies try). A prefer
    job (PreferJob) is estimated by `prefer_estimate`."""
    if getattr(cfg, "job", "train") == "prefer":
        return prefer_estimate(cfg, shape, sizes, cuda=cuda, batch=batch, seq_len=seq_len,
                               qlora=qlora)
    batch = per_process_batch(cfg) if batch is None else batch
    seq = sizes.seq_len if seq_len is None else min(seq_len, sizes.seq_len)
    return fsdp_share(cfg, shape, estimate(
        shape, batch=batch, seq_len=seq, r=cfg.lora.r, dtype_bytes=2 if cuda else 4,
        qlora=cfg.qlora if qlora is None else qlora,
        trained_tokens=min(sizes.trained_per_example, seq) * batch, cuda=cuda,
        target_modules=cfg.lora.target_modules), cuda)


def fsdp_share(cfg: Any, shape: ModelShape, est: Estimate, cuda: bool) -> Estimate:
    """One GPU's part of `est` under `distributed: fsdp` (FSDP2, one unit per decoder
    layer): its 1/N of the weights, the adapter and the optimizer, plus what is gathered
    whole while it runs: the embeddings (the unit with the final norm and the LM head,
    kept gathered through the forward) and two decoder layers (the one running and the one
    prefetched). Not yet measured on GPUs (bench/gpu/multi_gpu.sh); DDP and one
    process are unchanged."""
    if not cuda or not fsdp_sharded(cfg):
        return est
    n = cfg.processes
    embeddings = shape.vocab * shape.hidden
    per_param = est.weights / max(shape.params, 1)  # the dtype's bytes
    layer = (shape.params - embeddings) / max(shape.layers, 1) * per_param
    est.weights = int(est.weights / n + embeddings * per_param * (n - 1) / n + 2 * layer)
    est.adapter //= n
    est.optimizer //= n
    return est


def prefer_estimate(cfg: Any, shape: ModelShape, sizes: DataSizes, *, cuda: bool,
                    batch: int | None = None, seq_len: int | None = None,
                    qlora: bool | None = None) -> Estimate:
    """A prefer job (PreferJob): every step runs two sequences per row (DPO and ORPO: the
    chosen and the rejected reply, concatenated into one batch; KTO: the completion and its
    KL completion), so the train estimate at twice the batch; DPO and KTO add their
    reference: a frozen fp32 copy of the adapter and the reference pass's logits for the
    same positions (computed without gradients: one copy). ORPO (TRL's experimental
    trainer) takes the logits of every position, prompt and padding included, and its NLL
    term copies the chosen half once more: measured on an H200 capped at 24 GiB (Gemma-2-2B
    shapes, batch 2, bench/gpu/prefer_gemma2_2b.py), ORPO peaked 1.2 GiB above DPO, over an
    estimate that counted only the trained positions."""
    rows = per_process_batch(cfg) if batch is None else batch
    seq = sizes.seq_len if seq_len is None else min(seq_len, sizes.seq_len)
    sequences = 2 * rows
    trained = min(sizes.trained_per_example, seq) * sequences
    est = estimate(shape, batch=sequences, seq_len=seq, r=cfg.lora.r,
                   dtype_bytes=2 if cuda else 4, qlora=cfg.qlora if qlora is None else qlora,
                   trained_tokens=trained, cuda=cuda, target_modules=cfg.lora.target_modules)
    if cfg.method in ("dpo", "kto"):
        est.adapter += est.lora_params * 4
        est.logits += trained * shape.vocab * 4
    elif cfg.method == "orpo":
        est.logits = logits_bytes(seq * sequences, shape.vocab) + seq * rows * shape.vocab * 4
    return fsdp_share(cfg, shape, est, cuda)


@dataclass
class Device:
    kind: str           # cuda | cpu
    name: str
    free: float         # bytes available to this run
    total: float


def detect_device() -> Device:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return Device("cuda", torch.cuda.get_device_name(), float(free), float(total))
    import psutil

    vm = psutil.virtual_memory()
    return Device("cpu", "host RAM", float(vm.available), float(vm.total))


def fits(est: Estimate, device: Device, margin: float = MARGIN) -> bool:
    return est.total <= device.free * margin


def suggestion(cfg: Any, shape: ModelShape, sizes: DataSizes, device: Device,
               margin: float = MARGIN) -> str | None:
    """A setting that would fit: a smaller batch (same effective batch through grad_accum),
    then a shorter max_seq_len, then QLoRA on CUDA. None when nothing tried fits."""
    cuda = device.kind == "cuda"
    procs = getattr(cfg, "processes", 1)  # batch_size is theirs together: b each
    batch = per_process_batch(cfg)
    effective = batch * cfg.grad_accum
    b = batch
    while b > 1:
        b //= 2
        est = train_estimate(cfg, shape, sizes, cuda=cuda, batch=b)
        if fits(est, device, margin):
            return (f"batch_size: {b * procs}, grad_accum: {max(1, effective // b)} "
                    f"({est.describe()})")
    s = sizes.seq_len
    while s > 64:
        s //= 2
        est = train_estimate(cfg, shape, sizes, cuda=cuda, batch=1, seq_len=s)
        if fits(est, device, margin):
            return (f"batch_size: {procs}, grad_accum: {effective}, max_seq_len: {s} "
                    f"({est.describe()})")
    if cuda and not cfg.qlora and not fsdp_sharded(cfg):  # FSDP: no 4-bit weights
        est = train_estimate(cfg, shape, sizes, cuda=True, batch=1, qlora=True)
        if fits(est, device, margin):
            return f"qlora: true, batch_size: {procs}, grad_accum: {effective} ({est.describe()})"
    return None


def refusal(cfg: Any, shape: ModelShape, sizes: DataSizes, device: Device,
            est: Estimate | None = None) -> str | None:
    """Why the train job refuses to start on `device` (one line), or None when it fits."""
    est = est or train_estimate(cfg, shape, sizes, cuda=device.kind == "cuda")
    if fits(est, device):
        return None
    better = suggestion(cfg, shape, sizes, device)
    return (f"this run would not fit: it needs {est.describe()} and {device.name} has "
            f"{device.free / GiB:.1f} GiB free (a run may use {MARGIN:.0%} of it); "
            + (f"try {better}" if better else "no smaller setting fits either"))
