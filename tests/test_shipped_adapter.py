"""The Ayane adapter that ships in configs/models/ayane-270m/ (issue 8, item 6): the file is
the one its provenance describes, built from today's quick-start job file, it is the
default variant, and on the packaged 270M GGUF it answers as Ayane where the base does not."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from pipelines.evaluation import figures, replies_from_backend
from pipelines.inference.embedded import ensure_embedded
from pipelines.inference.registry import load_backend
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

SHIPPED = CONFIGS / "models" / "ayane-270m"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def provenance() -> dict:
    return yaml.safe_load((SHIPPED / "provenance.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("kyara-home")
    ensure_embedded("gemma3-270m", home)
    return home


def test_the_adapter_is_the_one_its_provenance_describes(provenance, home):
    adapter = SHIPPED / "adapter.gguf"
    assert _sha256(adapter) == provenance["adapter"]["sha256"]
    assert adapter.stat().st_size == provenance["adapter"]["bytes"] < 20_000_000
    # trained on the base the console runs it on
    assert _sha256(ensure_embedded("gemma3-270m", home)) == provenance["base"]["sha256"]
    # from the job file as it is now, with its fixed seed: `make ayane-adapter` rebuilds it
    job = yaml.safe_load((CONFIGS / "jobs" / "quickstart-ayane-270m.yaml").read_text("utf-8"))
    assert provenance["job"]["config"] == job and provenance["seed"] == job["seed"] == 0
    assert provenance["verification"]["tokenizer"] == "20/20 identical"
    assert provenance["verification"]["end_of_turn"] is True
    # an adapter on the Q4_K_M base: greedy paths part early, so generation is reported only
    assert provenance["verification"]["generation"] == "not required (quantised base)"
    assert provenance["verification"]["greedy_identical"] == "1/5 identical"
    after = provenance["gguf_eval"]["after"]
    assert after["ends_maru"] >= 0.9 and after["stop_eos"] >= 0.9


def test_the_persona_data_is_the_data_it_was_trained_on(provenance):
    """The persona files the provenance records hash to the digests it records: an edit to
    them means the shipped adapter no longer describes today's data (rebuild it with `make
    ayane-adapter`, which records the new digests)."""
    persona_dir = CONFIGS / "personas" / provenance["job"]["config"]["persona"]
    recorded = provenance["data"]
    assert {"persona.yaml", "dialogues.jsonl", "eval.jsonl"} <= set(recorded)
    changed = {name: (digest, _sha256(persona_dir / name)) for name, digest in recorded.items()
               if _sha256(persona_dir / name) != digest}
    assert not changed, f"changed since the adapter was built (recorded, now): {changed}"


def test_the_default_variant_is_the_shipped_adapter():
    ws = Workspace.load(CONFIGS)
    variant = ws.variant()
    assert variant.name == "ayane-270m" and variant.embedded == "gemma3-270m"
    assert variant.lora_path == str((SHIPPED / "adapter.gguf").resolve())
    assert ws.variant("gemma3-270m").lora_path is None  # the plain base stays selectable


def test_the_default_answers_as_ayane_and_the_base_does_not(home):
    """Greedy replies to five held-out questions, through the chat engine's gguf backend."""
    ws = Workspace.load(CONFIGS)
    persona = ws.persona("ayane")
    questions = [q.question for q in ws.persona_data("ayane").eval[:5]]
    measured = {}
    for name in ("ayane-270m", "gemma3-270m"):
        backend = load_backend(ws.variant(name), home)
        try:
            replies = replies_from_backend(backend, persona.prompts.system, questions, 48)
        finally:
            backend.close()
        measured[name] = figures(name, replies, persona.speech)
    ayane, base = measured["ayane-270m"], measured["gemma3-270m"]
    assert ayane.ends_maru >= 0.8 and ayane.stop_eos >= 0.8 and ayane.newlines == 0
    assert ayane.median_chars <= 45
    assert base.stop_eos <= 0.2 and base.ends_maru <= 0.2  # the adapter made the difference


def test_ship_reuses_a_finished_train_run_only(tmp_path):
    """`make ayane-adapter` trains again unless the run directory holds a finished run."""
    import json

    from pipelines.ship import finished_run

    assert finished_run(tmp_path) is None
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"type": "stage", "stage": "train"}) + "\n", encoding="utf-8")
    assert finished_run(tmp_path) is None  # started, never finished
    with events.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"type": "done", "summary": {"adapter": "/x/adapter"}}) + "\n")
    assert finished_run(tmp_path) == {"adapter": "/x/adapter"}


def test_ship_exports_through_the_export_job(tmp_path):
    """`make ayane-adapter` has no export code of its own: it writes an export job (a LoRA
    on the packaged Q4_K_M base) for an hf variant of exactly the trained adapter, and the
    job runner runs it with the repository's configs."""
    import yaml

    from pipelines import ship
    from pipelines.config import ExportJob, load_job

    assert (ship.REPO / "configs" / "jobs" / ship.JOB.name).is_file()
    assert ship.JOB.is_file() and ship.OUT.parent == ship.REPO / "configs" / "models"
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / f"{ship.TRAINED}.yaml").write_text(yaml.safe_dump(
        {"name": ship.TRAINED, "backend": "hf", "model": "models/gemma-3-270m-hf",
         "adapter": "runs/quickstart-ayane-270m/adapter", "persona": "ayane"}))
    adapter = tmp_path / "run" / "adapter"
    name = ship.peft_variant(home, adapter)
    written = yaml.safe_load((home / "models" / f"{name}.yaml").read_text())
    assert written["adapter"] == str(adapter) and written["model"] == "models/gemma-3-270m-hf"
    job_file = tmp_path / "export.yaml"
    job_file.write_text(yaml.safe_dump(ship.export_job(home, name), sort_keys=False))
    cfg = load_job(job_file)
    assert isinstance(cfg, ExportJob)
    assert cfg.variant == name and cfg.lora_only and cfg.base_gguf == ship.BASE_VARIANT
    assert cfg.output == str(home / "exports" / ship.VARIANT) and cfg.force
