"""Training labels: the reply and its turn terminator are trained, the prompt is masked, the
text is what inference renders, and every way of losing the terminator is caught."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipelines.prompting import render_prompt
from pipelines.training.examples import (
    IGNORE,
    LabelError,
    chat_template_for,
    check_labels,
    label_view,
    require_good_labels,
    terminator,
    tokenize,
    with_system,
)
from tests.training.conftest import DIALOGUES, write_dialogues

SYSTEM = "お嬢様のように振る舞ってください。"


@pytest.fixture(scope="module")
def gemma_tok(tiny_gemma):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gemma)


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def gemma_example(tok, messages=None, max_len=None):
    template = chat_template_for(tok, "gemma2")
    messages = with_system(messages or DIALOGUES[0]["messages"], SYSTEM)
    return template, tokenize(tok, template, messages, max_len)


def trained_text(tok, example) -> str:
    return tok.decode([i for i, x in zip(example.input_ids, example.labels, strict=True)
                       if x != IGNORE])


def test_gemma_trains_reply_and_end_of_turn_only(gemma_tok):
    template, ex = gemma_example(gemma_tok)
    assert trained_text(gemma_tok, ex) == "小野寺絢音と申しますわ。<end_of_turn>\n"
    assert all(x == IGNORE for x in ex.labels[:ex.prompt_tokens])
    end_text, end_id = terminator(gemma_tok, template)
    assert end_text == "<end_of_turn>"
    assert check_labels(gemma_tok, ex.input_ids, ex.labels, end_id) == []


def test_training_text_is_what_inference_renders(gemma_tok):
    template, ex = gemma_example(gemma_tok)
    messages = with_system(DIALOGUES[0]["messages"], SYSTEM)
    prompt = render_prompt(template, messages[:-1], bos_token="<bos>", eos_token="<eos>")
    prompt_ids = gemma_tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[:ex.prompt_tokens] == prompt_ids  # the ids the hf backend generates from
    text = gemma_tok.decode(ex.input_ids)
    assert text.count("<bos>") == 1
    assert "system" not in text and f"<start_of_turn>user\n{SYSTEM}\n\nお名前は？" in text


def test_same_labels_as_trl_prompt_completion(gemma_tok):
    """DESIGN.md's reference: TRL's conversational prompt-completion format labels the same
    tokens (the reply plus <end_of_turn>\\n) on the same ids."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from pipelines.prompting import fold_system
    from tests.training.conftest import GEMMA2_TEMPLATE

    messages = fold_system(with_system(DIALOGUES[0]["messages"], SYSTEM))
    _, ours = gemma_example(gemma_tok)
    model = AutoModelForCausalLM.from_pretrained(gemma_tok.name_or_path)
    gemma_tok.chat_template = GEMMA2_TEMPLATE
    trainer = SFTTrainer(model=model, processing_class=gemma_tok,
                         args=SFTConfig(output_dir="/tmp/kyara-trl-probe", report_to="none",
                                        use_cpu=True, bf16=False),
                         train_dataset=Dataset.from_list([{"prompt": messages[:-1],
                                                           "completion": messages[-1:]}]))
    theirs = trainer.train_dataset[0]
    assert theirs["input_ids"] == ours.input_ids
    assert theirs["labels"] == ours.labels


def test_masked_terminator_is_refused_with_the_view(gemma_tok):
    template, ex = gemma_example(gemma_tok)
    _, end_id = terminator(gemma_tok, template)
    labels = [IGNORE if i == end_id else x for i, x in zip(ex.input_ids, ex.labels, strict=True)]
    problems = check_labels(gemma_tok, ex.input_ids, labels, end_id)
    assert problems and "masked" in problems[0]
    with pytest.raises(LabelError) as caught:
        require_good_labels(gemma_tok, ex.input_ids, labels, end_id)
    message = str(caught.value)
    assert "\n" not in message and "<end_of_turn>[M]" in message and "kyara data inspect" in message
    assert "<end_of_turn>" in caught.value.view and "masked" in caught.value.view


def test_padding_equal_to_eos_that_masks_it_is_named(llama_tok):
    template = chat_template_for(llama_tok)
    ex = tokenize(llama_tok, template, DIALOGUES[0]["messages"])
    end_text, end_id = terminator(llama_tok, template)
    assert end_text == "<eos>" and ex.input_ids[-1] == end_id and ex.labels[-1] == end_id
    llama_tok.pad_token = llama_tok.eos_token
    try:
        # the old collator habit: every label equal to the pad id becomes -100
        labels = [IGNORE if x == llama_tok.pad_token_id else x for x in ex.labels]
        problems = check_labels(llama_tok, ex.input_ids, labels, end_id)
    finally:
        llama_tok.pad_token = "<pad>"
    assert any("padding token is the EOS" in p for p in problems)


def test_truncated_terminator_and_double_bos_are_refused(gemma_tok):
    template, ex = gemma_example(gemma_tok)
    _, end_id = terminator(gemma_tok, template)
    short = len(ex.input_ids) - 3  # cut inside the completion, before <end_of_turn>
    problems = check_labels(gemma_tok, ex.input_ids[:short], ex.labels[:short], end_id)
    assert any("missing" in p for p in problems)
    bos = gemma_tok.bos_token_id
    problems = check_labels(gemma_tok, [bos, *ex.input_ids], [IGNORE, *ex.labels], end_id)
    assert any("BOS appears twice" in p for p in problems)


def test_label_view_marks_every_token(gemma_tok):
    _, ex = gemma_example(gemma_tok)
    lines = label_view(gemma_tok, ex.input_ids, ex.labels).splitlines()
    assert len(lines) == len(ex.input_ids) + 1
    assert sum("TRAINED" in line for line in lines) == sum(x != IGNORE for x in ex.labels)


def test_cli_inspect(train_configs, tmp_path):
    from console.cli import app

    data = write_dialogues(tmp_path / "d.jsonl")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "inspect", str(data), "--variant", "tiny-gemma",
                                 "-n", "2", "--configs", str(train_configs)])
    assert result.exit_code == 0, result.output
    assert result.output.count("TRAINED") > 4
    assert "example 2 (t001)" in result.output
    assert "ok the turn terminator <end_of_turn> is trained" in result.output
    cut = runner.invoke(app, ["data", "inspect", str(data), "--variant", "tiny-gemma",
                              "--max-seq-len", "40", "--configs", str(train_configs)])
    assert cut.exit_code == 1
    assert "problem no token is trained" in cut.output
