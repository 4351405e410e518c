"""What an export's verification says where the generation check was waived (a quantised
file, a LoRA adapter on a quantised base): "not required", with the comparison kept beside
it as reported data, never a bare `passed` beside "1/5 identical". No converter needed."""

from __future__ import annotations

from pipelines.export.verify import GenerationRow, Verification


def verification(kind: str, required: bool, identical: int) -> Verification:
    rows = [GenerationRow(question=f"q{i}", hf_tokens=[1, 2, 3], gguf_tokens=[1, 2, 3],
                          first_divergence=None if i < identical else 1) for i in range(5)]
    return Verification(gguf="/x/out.gguf", kind=kind, require_generation=required,
                        sentences=20, sentences_identical=20,
                        end_of_turn={"ok": True, "token": "<end_of_turn>"}, generations=rows)


def test_lora_on_a_quantised_base_says_generation_not_required():
    check = verification("lora f16 on gemma-3-270m-q4_k_m.gguf", required=False, identical=1)
    summary = check.summary()
    assert summary["generation"] == "not required (quantised base)"
    assert summary["greedy_identical"] == "1/5 identical"  # still reported, as data
    assert summary["first_divergence"] == [None, 1, 1, 1, 1]
    assert summary["passed"] is True  # what was required (tokeniser, end of turn) passed
    assert check.to_dict()["generation"] == "not required (quantised base)"
    table = "\n".join(check.lines())
    assert "1/5 identical (generation check not required (quantised base): reported only)" in table


def test_a_quantised_file_says_why_too():
    summary = verification("Q4_K_M", required=False, identical=2).summary()
    assert summary["generation"] == "not required (quantised file)"
    assert summary["greedy_identical"] == "2/5 identical"


def test_where_it_is_required_generation_is_the_count():
    check = verification("f16", required=True, identical=5)
    assert check.summary()["generation"] == "5/5 identical"
    assert check.to_dict()["generation"] == "5/5 identical"
    assert "reported only" not in "\n".join(check.lines())


def test_one_rule_decides_when_generation_must_match():
    from pipelines.export.verify import generation_required

    for kind in ("f16", "F32", "lora + f16 base", "gemma-3-270m-f16", "ayane-base-f32"):
        assert generation_required(kind), kind
    for kind in ("bf16", "q8_0", "Q4_K_M", "gemma-3-270m-q4_k_m", "x-bf16"):
        assert not generation_required(kind), kind
