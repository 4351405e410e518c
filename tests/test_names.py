"""Names that become folders are checked at load (issue 27, item 7): a job, judge or variant
named `../x` or `ayane v2` is one line naming the file, the key and the value, at load and in
`kyara config check`, never a folder outside the home or a train run that fails to register
at its end."""

from __future__ import annotations

import shutil

import pytest
import yaml

from pipelines.config import ConfigError, load_job, load_variant
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS, run_kyara

RULE = ("name: expected: a name usable as a folder (letters, digits and . _ + -, starting "
        "with a letter or digit; no spaces, '/' or '..')")
BAD = ["../x", "ayane v2", "runs/x", "a..b", ".hidden", "-dash", ""]
GOOD = ["ayane-270m", "gemma-2-2b-jpn-it-ayane", "ayane_v2.1", "Ayane+RAG"]


def write(path, data):
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("name", BAD)
def test_bad_job_and_variant_names_are_one_line_at_load(tmp_path, name):
    for kind, body in {"eval": {"variants": ["gemma3-270m"]},
                       "train": {"base": "gemma3-270m-hf"}}.items():
        path = write(tmp_path / f"{kind}.yaml", {"job": kind, "name": name, **body})
        with pytest.raises(ConfigError) as err:
            load_job(path)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{path}: ")
        assert RULE in message and repr(name) in message
    variant = write(tmp_path / "v.yaml", {"name": name, "backend": "gguf",
                                          "embedded": "gemma3-270m"})
    with pytest.raises(ConfigError) as err:
        load_variant(variant)
    assert RULE in str(err.value)


def test_a_train_job_names_a_variant_it_can_register(tmp_path):
    path = write(tmp_path / "t.yaml", {"job": "train", "name": "ok-name",
                                       "base": "gemma3-270m-hf", "variant": "my variant"})
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert "variant: expected: a name usable as a folder" in str(err.value)


@pytest.mark.parametrize("name", GOOD)
def test_good_names_load(tmp_path, name):
    job = load_job(write(tmp_path / "e.yaml", {"job": "eval", "name": name,
                                               "variants": ["gemma3-270m"]}))
    assert job.name == name
    variant = load_variant(write(tmp_path / "v.yaml", {"name": name, "backend": "gguf",
                                                       "embedded": "gemma3-270m"}))
    assert variant.name == name


def test_config_check_names_a_bad_judge_name(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    judge = yaml.safe_load((configs / "judges" / "gpt-4o-mini.yaml").read_text("utf-8"))
    write(configs / "judges" / "sneaky.yaml", {**judge, "name": "../../etc"})
    ws = Workspace.load(configs)
    bad = [r for r in ws.check() if r.error]
    assert len(bad) == 1 and "sneaky.yaml" in bad[0].error and RULE in bad[0].error
    proc = run_kyara("config", "check", "--configs", str(configs))
    assert proc.returncode == 2 and "1 with errors" in proc.stdout
    assert "'../../etc'" in proc.stderr
