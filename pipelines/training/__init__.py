"""Fine-tuning: everything the `train` job uses, in small modules.

    data        training-data preparation (NFC, 。, newlines, de-dup): needs no torch
    examples    tokenised examples and labels, the label checks, the token-by-token view
    labels      `kyara data inspect` (the same steps with the tokenizer only)
    memory      the memory estimate (the one model: `kyara plan` uses it too), the device,
                a setting that would fit
    trainer     SFTTrainer with the trained-positions-only loss; the event callback;
                checkpoints with a completion marker
    mini_eval   the base and the trained variant answer the eval questions; figures from
                pipelines/evaluation (the console's own style checks)

Elsewhere: the dequantised 270M is pipelines/inference/dequantize.py, registering the
trained variant pipelines/variants.py.
"""
