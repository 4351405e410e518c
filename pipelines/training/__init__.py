"""Fine-tuning: everything the `train` job uses, in small modules.

    examples    tokenised examples and labels, the label checks, the token-by-token view
    labels      `kyara data inspect` (the same steps with the tokenizer only)
    memory      the memory estimate, the device, a setting that would fit
    trainer     SFTTrainer with the trained-positions-only loss; the event callback;
                checkpoints with a completion marker
    dequantize  the packaged Gemma 3 270M GGUF -> a cached HF folder
    register    the trained variant: store row + <home>/models/<name>.yaml
    evaluate    greedy replies and the style figures; mini_eval runs both variants

Data preparation (NFC, 。, newlines, de-dup) is pipelines/data.py: it needs no torch.
"""
