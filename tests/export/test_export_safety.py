"""The export's inputs cannot run code or write outside their place (issue 27, item 9): a
tar member with `..` in the converter's source archive is refused; a model folder that
names code of its own (auto_map) is refused unless the job trusts it."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipelines.config import ConfigError
from pipelines.export.convert import check_hf_dir
from pipelines.export.tools import extract_converters


def test_a_member_escaping_the_tools_folder_is_refused(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        data = b"print('pwned')\n"
        member = tarfile.TarInfo("llama_cpp_python-0.0.0/vendor/llama.cpp/../../../evil.py")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    target = tmp_path / "tools" / "0.0.0"
    with pytest.raises(ConfigError) as err:
        extract_converters(sdist, target, "0.0.0")
    assert "would land outside the tools folder" in str(err.value)
    assert not (tmp_path / "evil.py").exists() and not target.exists()


def test_a_folder_with_its_own_code_needs_trust(tmp_path, gemma3_dir):
    import shutil

    folder = tmp_path / "remote-code"
    shutil.copytree(gemma3_dir, folder)
    check_hf_dir(folder)  # a plain folder passes
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        check_hf_dir(folder)
    message = str(err.value)
    assert "auto_map" in message and "trust_remote_code: true" in message
    check_hf_dir(folder, trust_remote_code=True)
