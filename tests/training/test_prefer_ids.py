"""The ids the prefer job trains on equal TRL's own tokenisation of the same conversational
rows on the Gemma template (the tiny Gemma-2 tokenizer, the real Gemma-2 chat template), and
the label check guards the chosen and the rejected completion alike."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from pipelines.training.examples import chat_template_for, terminator
from pipelines.training.preference import encode
from tests.training.prefer_helpers import kto_rows, pair_rows


@pytest.fixture(scope="module")
def gemma_tok(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    template = chat_template_for(tok, "gemma2")
    end_text, end_id = terminator(tok, template)
    return tok, template, end_text, end_id


def test_dpo_ids_equal_trl_tokenisation_on_the_gemma_template(gemma_tok):
    from trl import DPOTrainer

    tok, template, end_text, end_id = gemma_tok
    rows = pair_rows()
    ours = encode(rows, "dpo", tok, template, None, 10_000, end_text).rows
    conversational = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                        for r in rows])
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    fake = SimpleNamespace(_tokenizer=tok)
    theirs = DPOTrainer._prepare_dataset(fake, conversational, tok, args, "train")
    for mine, trl_row in zip(ours, theirs, strict=True):
        assert mine["prompt_ids"] == trl_row["prompt_ids"]
        assert mine["chosen_ids"] == trl_row["chosen_ids"]
        assert mine["rejected_ids"] == trl_row["rejected_ids"]
        # the completion is the reply and its turn terminator (then the template's newline)
        assert end_id in mine["chosen_ids"] and end_id in mine["rejected_ids"]
        assert tok.decode(mine["chosen_ids"]).endswith("<end_of_turn>\n")


def test_kto_ids_equal_trl_tokenisation_on_the_gemma_template(gemma_tok):
    from trl import KTOTrainer

    tok, template, end_text, _ = gemma_tok
    rows = kto_rows()
    ours = encode(rows, "kto", tok, template, None, 10_000, end_text).rows
    unpaired = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label")}
                                  for r in rows])
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, per_device_train_batch_size=2)
    fake = SimpleNamespace(_tokenizer=tok, calculate_KL=False, desirable_weight=1.0,
                           undesirable_weight=1.0)
    theirs = KTOTrainer._prepare_dataset(fake, unpaired, tok, args, "train")
    for mine, trl_row in zip(ours, theirs, strict=True):
        assert mine["prompt_ids"] == trl_row["prompt_ids"]
        assert mine["completion_ids"] == trl_row["completion_ids"]
        assert mine["label"] == trl_row["label"]


def test_orpo_ids_are_trls_but_without_a_second_stop(gemma_tok):
    """TRL's ORPO tokenises the rendered text and appends EOS after <end_of_turn>; kyara
    stops where inference stops (the turn terminator), so its ids are TRL's minus that EOS."""
    from trl.data_utils import maybe_apply_chat_template
    from trl.experimental.orpo import ORPOTrainer

    tok, template, end_text, _ = gemma_tok
    rows = pair_rows()
    ours = encode(rows, "orpo", tok, template, None, 10_000, end_text).rows
    fake = SimpleNamespace(processing_class=tok, is_encoder_decoder=False, max_length=10_000)
    fake.build_tokenized_answer = lambda p, a: ORPOTrainer.build_tokenized_answer(fake, p, a)
    for mine, row in zip(ours, rows, strict=True):
        text = maybe_apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")},
                                         tok)
        theirs = ORPOTrainer.tokenize_row(fake, text)
        assert theirs["prompt_input_ids"] == mine["kyara_prompt"]
        for side in ("chosen", "rejected"):
            full = theirs[f"{side}_input_ids"]
            assert full[-1] == tok.eos_token_id
            assert full[:-1] == mine["kyara_prompt"] + mine[f"kyara_{side}"]


def test_a_rejected_reply_cut_before_its_terminator_is_refused(train_configs, tmp_path):
    """max_seq_len cutting the longer (rejected) completion: the train job's label check
    stops the run, naming the row and the side."""
    from pipelines.config import ConfigError, parse_job
    from pipelines.jobs import JobContext, get_job
    from pipelines.workspace import Workspace
    from tests.training.prefer_helpers import prefer_job, write_rows

    rows = pair_rows()[:2]
    rows[1]["rejected"] = [{"role": "assistant", "content": "とても長い返事ですわ。" * 40}]
    data = write_rows(tmp_path / "p.jsonl", rows)
    cfg = parse_job(prefer_job(data=str(data), system_prompt=False, max_seq_len=64), "t")
    ctx = JobContext.create(Workspace.load(train_configs), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"row 1 \(t001\) rejected: the turn terminator"):
        list(get_job("prefer").run(cfg, ctx))
    assert (ctx.home / "runs" / "tiny-prefer" / "labels.txt").is_file()
