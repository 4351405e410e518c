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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GiB = 1024 ** 3


@dataclass
class ModelShape:
    params: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any, params: int | None = None) -> ModelShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = text.hidden_size
        layers = text.num_hidden_layers
        inter = getattr(text, "intermediate_size", 4 * hidden)
        vocab = text.vocab_size
        if params is None:  # from the shapes: embeddings + attention + MLP per layer
            head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
            kv = getattr(text, "num_key_value_heads", text.num_attention_heads)
            attn = hidden * head_dim * (2 * text.num_attention_heads + 2 * kv)
            params = vocab * hidden + layers * (attn + 3 * hidden * inter)
            if not getattr(text, "tie_word_embeddings", False):
                params += vocab * hidden
        return cls(params, hidden, layers, text.num_attention_heads, inter, vocab)


@dataclass
class Estimate:
    weights: float
    adapter: float      # LoRA weights + gradients + optimizer state
    optimizer: float
    activations: float
    overhead: float
    lora_params: int

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.optimizer + self.activations + self.overhead

    def describe(self) -> str:
        return (f"~{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.2f}, adapter "
                f"{self.adapter / GiB:.2f}, optimizer {self.optimizer / GiB:.2f}, activations "
                f"{self.activations / GiB:.2f}, overhead {self.overhead / GiB:.2f})")

    def to_dict(self) -> dict[str, float]:
        data = {k: round(v / GiB, 3) for k, v in asdict(self).items() if k != "lora_params"}
        data["total"] = round(self.total / GiB, 3)
        data["lora_params"] = self.lora_params
        return data


def lora_params(shape: ModelShape, r: int) -> int:
    """all-linear LoRA: q, k, v, o, gate, up, down; each adds r x (in + out). Counted as if
    k and v were full width (grouped-query attention makes them smaller): an upper bound."""
    h, i = shape.hidden, shape.intermediate
    return shape.layers * r * (4 * 2 * h + 3 * (h + i))


def estimate(shape: ModelShape, *, batch: int, seq_len: int, r: int, dtype_bytes: int,
             qlora: bool = False, trained_tokens: int | None = None, cuda: bool = False
             ) -> Estimate:
    n_lora = lora_params(shape, r)
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
    trained = trained_tokens if trained_tokens is not None else max(1, tokens // 4)
    activations += 3 * trained * shape.vocab * 4  # logits in fp32
    activations += tokens * shape.hidden * 4 * 2  # embeddings in and hidden states out
    return Estimate(
        weights=weights,
        adapter=n_lora * 4 * 2,         # fp32 weights + gradients
        optimizer=n_lora * 4 * 2,       # AdamW: exp_avg, exp_avg_sq
        activations=activations,
        # CUDA: context and allocator slack. CPU: the process itself (torch, the tokenizer,
        # datasets), which the peak RSS counts: ~2 GiB measured with the 270M quick-start.
        overhead=(1.0 if cuda else 2.0) * GiB,
        lora_params=n_lora,
    )


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


def fits(est: Estimate, device: Device, margin: float = 0.9) -> bool:
    return est.total <= device.free * margin


def suggestion(shape: ModelShape, device: Device, *, batch: int, grad_accum: int, seq_len: int,
               r: int, dtype_bytes: int, qlora: bool, margin: float = 0.9) -> str | None:
    """A setting that would fit: a smaller batch (same effective batch through grad_accum),
    then a shorter max_seq_len, then QLoRA on CUDA. None when nothing tried fits."""
    b = batch
    while b > 1:
        b //= 2
        est = estimate(shape, batch=b, seq_len=seq_len, r=r, dtype_bytes=dtype_bytes,
                       qlora=qlora, cuda=device.kind == "cuda")
        if fits(est, device, margin):
            accum = max(1, (batch * grad_accum) // b)
            return f"batch_size: {b}, grad_accum: {accum} ({est.describe()})"
    s = seq_len
    while s > 64:
        s //= 2
        est = estimate(shape, batch=1, seq_len=s, r=r, dtype_bytes=dtype_bytes, qlora=qlora,
                       cuda=device.kind == "cuda")
        if fits(est, device, margin):
            return f"batch_size: 1, grad_accum: {batch * grad_accum}, max_seq_len: {s} ({est.describe()})"
    if device.kind == "cuda" and not qlora:
        est = estimate(shape, batch=1, seq_len=seq_len, r=r, dtype_bytes=dtype_bytes,
                       qlora=True, cuda=True)
        if fits(est, device, margin):
            return f"qlora: true, batch_size: 1, grad_accum: {batch * grad_accum} ({est.describe()})"
    return None
