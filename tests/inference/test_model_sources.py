"""A missing model is named, not searched for: one resolution of an hf variant's `model:`
for every loader. A local path that is not there fails at once (or is made, when kyara
makes it); a hub id with no cached copy fails at once offline, naming the id and how to
fetch it. No test reaches a public host: the probe is replaced or its socket is."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

from pipelines.config import ConfigError, HFVariant
from pipelines.inference import sources
from pipelines.inference.base import BackendError
from pipelines.inference.registry import load_backend
from pipelines.inference.sources import ModelSourceError, looks_like_hub_id, resolve_hf_model
from tests.conftest import CONFIGS, run_kyara


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, the probe replaced by a counter (offline by default),
    and a snapshot_download that records whether anything asked the network."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    state = {"probes": 0, "answer": "huggingface.co cannot be reached (test)", "cache": cache}

    def probe():
        state["probes"] += 1
        return state["answer"]

    monkeypatch.setattr(sources, "probe_hub", probe)
    return state


def fake_cached_model(cache, repo_id, weights=True):
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text("{}")
    if weights:
        (snapshot / "model.safetensors").write_bytes(b"")
    return snapshot


def test_a_kyara_home_folder_is_a_path_never_a_hub_id(tmp_path):
    assert looks_like_hub_id("google/gemma-2-2b-jpn-it")
    for value in ("models/gemma-3-270m-hf", "runs/x", "./x/y", "/abs/x", "~/x", "a/b/c"):
        assert not looks_like_hub_id(value), value
    # a first folder that exists in the home is a path too
    (tmp_path / "mine").mkdir()
    assert not sources.is_hub_id("mine/model", tmp_path)
    assert sources.is_hub_id("mine/model", tmp_path / "elsewhere")


@pytest.mark.parametrize("value", ["runs/nothing/here", "/nowhere/model", "./not-made"])
def test_a_missing_local_path_fails_at_once_naming_it(tmp_path, hub, value, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as info:
        resolve_hf_model(value, tmp_path / "home", variant="v")
    message = str(info.value)
    assert "model folder not found" in message and "\n" not in message
    assert value.lstrip("./").split("/")[-1] in message
    assert hub["probes"] == 0  # no network question for a path
    assert isinstance(info.value, BackendError) and isinstance(info.value, ConfigError)


def test_a_train_run_folder_says_which_job_makes_it(tmp_path, hub):
    with pytest.raises(ModelSourceError, match=r"a train job writes it: kyara jobs run"):
        resolve_hf_model("runs/my-train/merged", tmp_path, variant="v")


def test_an_uncached_hub_id_offline_fails_at_once_and_says_how_to_fetch_it(tmp_path, hub,
                                                                          monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as info:
        resolve_hf_model("kyara-test/no-such-model", tmp_path, variant="v")
    message = str(info.value)
    assert "kyara-test/no-such-model" in message and "HF_HUB_OFFLINE=1 is set" in message
    assert "huggingface-cli download kyara-test/no-such-model" in message
    assert "HF_HOME" in message and str(hub["cache"]) in message
    assert hub["probes"] == 0  # the environment said so: no probe


def test_without_the_flag_the_probe_decides_once(tmp_path, hub):
    with pytest.raises(ModelSourceError, match="huggingface.co cannot be reached"):
        resolve_hf_model("kyara-test/no-such-model", tmp_path, variant="v")
    assert hub["probes"] == 1
    hub["answer"] = None  # online: the id goes to transformers, which downloads it
    assert resolve_hf_model("kyara-test/no-such-model", tmp_path, variant="v") == \
        "kyara-test/no-such-model"


def test_a_cached_hub_id_is_used_as_a_folder_without_the_network(tmp_path, hub):
    snapshot = fake_cached_model(hub["cache"], "kyara-test/cached")
    assert resolve_hf_model("kyara-test/cached", tmp_path, variant="v") == str(snapshot)
    assert hub["probes"] == 0
    # a cache with the config only (AutoConfig ran once) is not a model: offline, say so
    fake_cached_model(hub["cache"], "kyara-test/partial", weights=False)
    with pytest.raises(ModelSourceError, match="kyara-test/partial"):
        resolve_hf_model("kyara-test/partial", tmp_path, variant="v")


def test_export_needs_a_local_copy_even_online(tmp_path, hub):
    hub["answer"] = None
    with pytest.raises(ModelSourceError, match="reads files only.*huggingface-cli download"):
        resolve_hf_model("kyara-test/no-such-model", tmp_path, variant="v", local=True)
    assert hub["probes"] == 0


def test_the_real_probe_runs_once_per_process_and_is_bounded(monkeypatch):
    calls = []

    def refuse(address, timeout=None):
        calls.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    sources.probe_hub.cache_clear()
    try:
        first = sources.probe_hub()
        assert sources.probe_hub() == first  # cached: one connection for the process
        assert "hub.invalid cannot be reached (Connection refused)" == first
        assert calls == [(("hub.invalid", 443), sources.PROBE_TIMEOUT_S)]

        # a connection (or a name lookup) that hangs is given up after the timeout
        gate = threading.Event()
        monkeypatch.setattr(socket, "create_connection",
                            lambda *a, **k: gate.wait(30) and socket.socket())
        monkeypatch.setattr(sources, "PROBE_TIMEOUT_S", 0.2)
        sources.probe_hub.cache_clear()
        started = time.monotonic()
        assert sources.probe_hub() == "hub.invalid did not answer within 0.2 s"
        assert time.monotonic() - started < 2
        gate.set()
    finally:
        sources.probe_hub.cache_clear()


def test_the_dequantised_folder_is_made_on_first_use(tmp_path, hub, monkeypatch):
    """`models/gemma-3-270m-hf` (configs/models/gemma3-270m-hf.yaml) is the embedded GGUF
    dequantised: made when first needed, as the GGUF itself is assembled."""
    from pipelines.inference import dequantize, embedded

    home = tmp_path / "home"
    made = []

    def fake_dequantize(source, target):
        made.append((source, target))
        target.mkdir(parents=True)
        return target

    monkeypatch.setattr(embedded, "ensure_embedded", lambda name, h: h / "models" / f"{name}.gguf")
    monkeypatch.setattr(dequantize, "dequantize_gguf", fake_dequantize)
    folder = home / "models" / "gemma-3-270m-hf"
    assert resolve_hf_model("models/gemma-3-270m-hf", home, variant="gemma3-270m-hf") == \
        str(folder.resolve())
    assert made == [(home / "models" / "gemma3-270m.gguf", folder)]
    assert hub["probes"] == 0
    # another missing folder under models/ is not made: named
    with pytest.raises(ModelSourceError, match="model folder not found"):
        resolve_hf_model("models/other-hf", home, variant="v")

    def failing(source, target):
        raise ConfigError("reading a GGUF into transformers needs the gguf package")

    monkeypatch.setattr(dequantize, "dequantize_gguf", failing)
    shutil.rmtree(folder)
    with pytest.raises(ModelSourceError, match=r"cannot make .*gemma-3-270m-hf from the "
                                               r"embedded GGUF 'gemma3-270m': reading a GGUF"):
        resolve_hf_model("models/gemma-3-270m-hf", home, variant="gemma3-270m-hf")


def test_load_backend_names_the_missing_hub_model_before_importing_anything(tmp_path, hub,
                                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    variant = HFVariant(name="remote", backend="hf", model="kyara-test/no-such-model")
    with pytest.raises(BackendError, match="huggingface-cli download kyara-test/no-such-model"):
        load_backend(variant, tmp_path)


def test_data_inspect_names_the_missing_model_at_once(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "models" / "remote-hf.yaml").write_text(
        "name: remote-hf\nbackend: hf\nmodel: kyara-test/no-such-model\n", encoding="utf-8")
    (configs / "models" / "lost-hf.yaml").write_text(
        "name: lost-hf\nbackend: hf\nmodel: runs/gone/merged\n", encoding="utf-8")
    data = configs / "personas" / "ayane" / "dialogues.jsonl"
    env = {"KYARA_CONFIGS": str(configs), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}
    for variant, expect in (("remote-hf", "huggingface-cli download kyara-test/no-such-model"),
                            ("lost-hf", "model folder not found")):
        proc = run_kyara("data", "inspect", str(data), "--variant", variant, env=env,
                         timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expect in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr  # no retry loop


def test_the_notice_before_making_a_folder(tmp_path):
    variant = HFVariant(name="gemma3-270m-hf", backend="hf", model="models/gemma-3-270m-hf")
    notice = sources.making_notice(variant, tmp_path)
    assert notice.startswith(f"making {tmp_path / 'models' / 'gemma-3-270m-hf'} from the "
                             "embedded GGUF 'gemma3-270m'")
    (tmp_path / "models" / "gemma-3-270m-hf").mkdir(parents=True)
    assert sources.making_notice(variant, tmp_path) is None  # made: nothing to say
    other = HFVariant(name="o", backend="hf", model="models/other")
    assert sources.making_notice(other, tmp_path) is None


@pytest.mark.slow
def test_data_inspect_on_a_fresh_home_makes_the_dequantised_model(tmp_path):
    """The report of issue 13: a minute in huggingface_hub's retry loop, then a long error.
    Now the folder is made (once) and the examples are shown."""
    data = CONFIGS / "personas" / "ayane" / "dialogues.jsonl"
    env = {"KYARA_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    proc = run_kyara("data", "inspect", str(data), "--variant", "gemma3-270m-hf", env=env,
                     timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kyara: making " in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "home" / "models" / "gemma-3-270m-hf" / "kyara-dequantized.json").is_file()
    assert "the turn terminator <end_of_turn> is trained" in proc.stdout
