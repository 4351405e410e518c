"""Trained variants in <home>/models/ are listed beside configs/models/ (the user's own file
of the same name wins), and the memory estimate refuses what will not fit."""

from __future__ import annotations

import yaml

from pipelines.config import HFVariant, TrainJob
from pipelines.training.memory import (
    DataSizes,
    Device,
    ModelShape,
    estimate,
    fits,
    suggestion,
    train_estimate,
)
from pipelines.variants import trained_variant, write_variant_yaml
from pipelines.workspace import Workspace


def test_home_variants_are_listed_and_configs_win(train_configs, tmp_path):
    ws = Workspace.load(train_configs)
    home = ws.settings.home_path()
    base = ws.variant("tiny-gemma")
    trained = trained_variant(base, "tiny-gemma-ayane", tmp_path / "adapter", "test")
    path = write_variant_yaml(trained, home, "written by a test")
    assert path == home / "models" / "tiny-gemma-ayane.yaml"
    assert path.read_text(encoding="utf-8").startswith("# written by a test")
    again = Workspace.load(train_configs)
    assert list(again.variant_files())[:2] == ["tiny-gemma", "tiny-llama"]  # configs first
    loaded = again.variant("tiny-gemma-ayane")
    assert isinstance(loaded, HFVariant) and loaded.adapter == str((tmp_path / "adapter").resolve())
    assert any(r.path == path and r.error is None for r in again.check())
    # a configs/models file of the same name is the user's own: it wins
    (train_configs / "models" / "tiny-gemma-ayane.yaml").write_text(yaml.safe_dump(
        {"name": "tiny-gemma-ayane", "backend": "hf", "model": "elsewhere"}), encoding="utf-8")
    assert Workspace.load(train_configs).variant("tiny-gemma-ayane").model == "elsewhere"


def test_memory_estimate_grows_with_the_batch_and_suggests_a_smaller_one():
    shape = ModelShape(params=2_600_000_000, hidden=2304, layers=26, heads=8,
                       intermediate=9216, vocab=256000)
    small = estimate(shape, batch=1, seq_len=512, r=16, dtype_bytes=2, cuda=True)
    big = estimate(shape, batch=16, seq_len=512, r=16, dtype_bytes=2, cuda=True)
    assert big.activations > 10 * small.activations and big.weights == small.weights
    qlora = estimate(shape, batch=16, seq_len=512, r=16, dtype_bytes=2, qlora=True, cuda=True)
    assert qlora.weights < 0.7 * big.weights  # NF4 layers, fp32 embeddings
    gpu = Device("cuda", "RTX 3090", 22 * 1024 ** 3, 24 * 1024 ** 3)
    assert not fits(estimate(shape, batch=64, seq_len=1024, r=16, dtype_bytes=2, cuda=True), gpu)
    cfg = TrainJob(job="train", name="t", base="x", batch_size=64, grad_accum=1,
                   max_seq_len=1024)
    sizes = DataSizes(seq_len=1024, trained_per_example=256)
    assert not fits(train_estimate(cfg, shape, sizes, cuda=True), gpu)
    hint = suggestion(cfg, shape, sizes, gpu)
    assert hint is not None and hint.startswith("batch_size: ")
    size = int(hint.split(",")[0].split(": ")[1])
    accum = int(hint.split("grad_accum: ")[1].split(" ")[0])
    assert size < 64 and size * accum == 64  # the same effective batch
    assert fits(train_estimate(cfg, shape, sizes, cuda=True, batch=size), gpu)
