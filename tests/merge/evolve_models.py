"""Three tiny Llama models with a tokenizer and a chat template, for evolve tests.

Model 0 is built to answer with one marker token (わ) whatever it is asked: its
embeddings are one vector, its layers add nothing (o_proj and down_proj are zero), and its
lm_head row for the marker points along that vector. Models 1 and 2 are random. The more
weight a merge gives model 0, the more of the marker its replies hold, so a judge that
scores the marker's share rewards weight on model 0, which the search must find."""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "わ"
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CORPUS = [
    "こんにちは、絢音ですわ。", "紅茶がとても好きですの。", "ミュージカル女優が夢ですわ。",
    "飼っている犬の名前を教えて。", "レオはゴールデンレトリバーですわ。", "わわわ",
    "Hello there, how are you today?", "I love musicals.",
]


def make_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                      eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    wrapped.chat_template = TEMPLATE
    wrapped.save_pretrained(out)
    return out


def make_models(root: Path, *, hidden: int = 64, layers: int = 2, strength: float = 0.15
                ) -> list[Path]:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok_dir = make_tokenizer(root / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    marker = tok.convert_tokens_to_ids(tok.tokenize(MARKER))
    assert len(marker) == 1, f"the marker must be one token, got {marker}"
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=512,
                         intermediate_size=2 * hidden, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            if seed == 0:
                direction = torch.randn(hidden) * 0.05
                model.model.embed_tokens.weight.copy_(direction.expand(512, hidden))
                for layer in model.model.layers:
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
                model.model.norm.weight.fill_(1.0)
                unit = direction / direction.norm()
                model.lm_head.weight[marker[0]] = strength * unit
                model.lm_head.weight[tok.eos_token_id] = 0
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                                   bos_token_id=tok.bos_token_id,
                                                   pad_token_id=tok.pad_token_id)
        path = root / f"m{seed}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out


def marker_share(prompt: str) -> float:
    """The marker's share of the characters of the reply under judgment (the last
    [assistant] line between the judge's data delimiters)."""
    blocks = re.findall(r"<<<DATA-(\w+)>>>(.*?)<<<END-\1>>>", prompt, re.S)
    text = blocks[-1][1] if blocks else ""
    replies = re.findall(r"^\[assistant\] (.*)$", text, re.M)
    reply = replies[-1] if replies else ""
    return reply.count(MARKER) / len(reply) if reply else 0.0
