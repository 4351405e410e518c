"""Typed configs: the shipped configs/ validate; bad input is one line, exit 2, no traceback."""

import shutil
from pathlib import Path

import pytest

from pipelines.config import (
    AppSettings,
    ConfigError,
    GGUFVariant,
    HFVariant,
    Persona,
    TrainJob,
    apply_env,
    load_job,
    load_variant,
    load_yaml,
)
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS, run_kyara


def _one_line(message: str) -> None:
    assert message.strip(), "empty message"
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    assert "Traceback" not in message


# --- the shipped configuration ---------------------------------------------------------


def test_shipped_configs_all_validate():
    ws = Workspace.load(CONFIGS)
    results = ws.check()
    errors = [r.error for r in results if r.error]
    assert errors == []
    kinds = {r.kind for r in results}
    # every kind of file is present and was checked
    assert {"app", "persona", "knowledge", "dialogues", "eval", "calibration", "variant",
            "judge", "criterion", "job"} <= kinds


def test_config_check_command_passes_on_shipped_configs():
    proc = run_kyara("config", "check")
    assert proc.returncode == 0, proc.stderr
    assert "0 with errors" in proc.stdout
    assert "persona.yaml" in proc.stdout and "kyara.yaml" in proc.stdout


def test_every_job_kind_has_a_schema_and_parses(tmp_path):
    for kind, body in {
        "train": "base: gemma-2-2b-jpn-it",
        "curate": "",
        "merge": "merge: {merge_method: linear, models: []}",
        "evolve": "models: [a, b]",
        "export": "variant: x",
        "eval": "variants: [x]",
        "index": "",
    }.items():
        f = tmp_path / f"{kind}.yaml"
        f.write_text(f"job: {kind}\nname: {kind}-1\n{body}\n", encoding="utf-8")
        job = load_job(f)
        assert job.job == kind and job.name == f"{kind}-1"


def test_variant_backends_are_typed():
    ws = Workspace.load(CONFIGS)
    assert isinstance(ws.variant("gemma3-270m"), GGUFVariant)
    hf = ws.variant("gemma-2-2b-jpn-it")
    assert isinstance(hf, HFVariant) and hf.attn_implementation == "eager"


# --- errors: one line naming file, key path, expected and found --------------------------


def test_unknown_key_names_file_path_and_allowed_keys(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("job: train\nname: t\nbase: b\nlora:\n  rank: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_job(f)
    msg = str(info.value)
    _one_line(msg)
    assert str(f) in msg and "lora.rank" in msg and "unknown key 'rank'" in msg
    assert "alpha" in msg  # the keys it expected


def test_wrong_type_names_expected_and_found(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("name: m\nbackend: gguf\npath: x.gguf\ngeneration:\n  temperature: hot\n",
                 encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_variant(f)
    msg = str(info.value)
    _one_line(msg)
    assert str(f) in msg and "generation.temperature" in msg
    assert "number" in msg and "'hot'" in msg


def test_unknown_backend_and_job_kind(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("name: m\nbackend: vllm\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"backend: expected one of: hf, gguf, openai; found 'vllm'"):
        load_variant(f)
    f.write_text("job: distill\nname: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"job: expected one of: train, curate"):
        load_job(f)
    f.write_text("name: x\njob: train\nbase: b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="job: must be the first key"):
        load_job(f)


def test_malformed_yaml_gives_line_and_column(tmp_path):
    f = tmp_path / "kyara.yaml"
    f.write_text("home: /tmp\nkeymap: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_yaml(f, AppSettings)
    msg = str(info.value)
    _one_line(msg)
    assert msg.startswith(f"{f}:") and "invalid YAML" in msg


def test_missing_and_non_utf8_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(tmp_path / "absent.yaml", AppSettings)
    f = tmp_path / "sjis.yaml"
    f.write_bytes("profile: お嬢様\n".encode("shift_jis"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_yaml(f, Persona)
    f.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_yaml(f, Persona)
    f.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping of keys, found list"):
        load_yaml(f, Persona)


def test_gguf_variant_needs_exactly_one_source(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("name: g\nbackend: gguf\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="exactly one of 'path' and 'embedded'"):
        load_variant(f)


def test_system_rag_needs_context_placeholder(tmp_path):
    src = (CONFIGS / "personas" / "ayane" / "persona.yaml").read_text(encoding="utf-8")
    f = tmp_path / "persona.yaml"
    f.write_text(src.replace("{context}", ""), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"prompts.system_rag: .*\{context\}"):
        load_yaml(f, Persona)


@pytest.mark.parametrize(
    "content, expect",
    [
        ("home: [\n", "invalid YAML"),
        ("home: /tmp\nbogus: 1\n", "unknown key 'bogus'"),
        (b"\xff\xfehome: x\n", "not UTF-8"),
    ],
)
def test_config_check_cli_one_line_exit_2(tmp_path, content, expect):
    f = tmp_path / "kyara.yaml"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content, encoding="utf-8")
    proc = run_kyara("config", "check", str(f))
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, proc.stderr
    assert expect in error_lines[0] and str(f) in error_lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_config_check_whole_tree_reports_bad_file_and_cross_references(tmp_path):
    tree = tmp_path / "configs"
    shutil.copytree(CONFIGS, tree)
    (tree / "models" / "broken.yaml").write_text("name: broken\nbackend: hf\n", encoding="utf-8")
    app = (tree / "kyara.yaml").read_text(encoding="utf-8")
    (tree / "kyara.yaml").write_text(app.replace("default_persona: ayane",
                                                 "default_persona: nobody"), encoding="utf-8")
    proc = run_kyara("config", "check", "--configs", str(tree))
    assert proc.returncode == 2
    assert "broken.yaml: model: missing required key" in proc.stderr
    assert "default_persona: expected one of ['ayane'], found 'nobody'" in proc.stderr


def test_chat_with_missing_variant_is_one_line(tmp_path):
    proc = run_kyara("chat", "--variant", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("kyara: model variant 'nope' not found")
    _one_line(proc.stderr)


def test_env_overrides_home_and_store(tmp_path):
    s = AppSettings(home="/x/home")
    assert s.store_path() == Path("/x/home/store")
    s2 = apply_env(s, {"KYARA_HOME": str(tmp_path / "h")})
    assert s2.store_path() == tmp_path / "h" / "store"
    s3 = apply_env(s, {"KYARA_HOME": "/h", "KYARA_STORE": str(tmp_path / "st")})
    assert s3.home_path() == Path("/h") and s3.store_path() == tmp_path / "st"


def test_env_applies_through_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("KYARA_STORE", str(tmp_path / "elsewhere"))
    ws = Workspace.load(CONFIGS)
    assert ws.settings.store_path() == tmp_path / "elsewhere"


def test_train_job_rejects_bad_values(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("job: train\nname: t\nbase: b\nlearning_rate: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"learning_rate: expected: input should be greater than 0; found -1"):
        load_job(f)
    assert TrainJob(job="train", name="t", base="b").lora.r == 16


def test_variant_paths_starting_with_dot_are_taken_from_the_yaml_folder(tmp_path):
    from pipelines.config import load_variant

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "v.yaml").write_text(
        "name: v\nbackend: gguf\nembedded: gemma3-270m\nlora_path: ./v/adapter.gguf\n",
        encoding="utf-8")
    (folder / "w.yaml").write_text(
        "name: w\nbackend: gguf\npath: models/w.gguf\nlora_path: ../w.gguf\n", encoding="utf-8")
    assert load_variant(folder / "v.yaml").lora_path == str(folder / "v" / "adapter.gguf")
    w = load_variant(folder / "w.yaml")
    assert w.lora_path == str(tmp_path / "w.gguf")
    assert w.path == "models/w.gguf"  # no ./: still taken from the kyara home, as before
