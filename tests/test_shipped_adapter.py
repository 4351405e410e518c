"""The Ayane adapters that ship in configs/models/<variant>/ (issue 8, item 6; the one
trained on the retrieval prompt too, issue 17): each file is the one its provenance
describes, built from today's job file and persona data; `ayane-270m` is the default
variant, and on the packaged 270M GGUF both answer as Ayane where the base does not."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from pipelines import ship
from pipelines.evaluation import figures, replies_from_backend
from pipelines.inference.embedded import ensure_embedded
from pipelines.inference.registry import load_backend
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

SHIPPED = CONFIGS / "models" / "ayane-270m"
VARIANTS = sorted(ship.SHIPPED)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=VARIANTS)
def shipped(request) -> ship.Shipped:
    return ship.SHIPPED[request.param]


@pytest.fixture(scope="module")
def provenance(shipped) -> dict:
    return yaml.safe_load((shipped.out / "provenance.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("kyara-home")
    ensure_embedded("gemma3-270m", home)
    return home


def test_the_adapter_is_the_one_its_provenance_describes(shipped, provenance, home):
    assert provenance["variant"] == shipped.variant
    adapter = shipped.out / "adapter.gguf"
    assert _sha256(adapter) == provenance["adapter"]["sha256"]
    assert adapter.stat().st_size == provenance["adapter"]["bytes"] < 20_000_000
    # trained on the base the console runs it on
    assert _sha256(ensure_embedded("gemma3-270m", home)) == provenance["base"]["sha256"]
    # from the job file as it is now, with its fixed seed: `make ayane-adapter` rebuilds it
    assert provenance["job"]["file"] == str(shipped.job.relative_to(ship.REPO))
    job = yaml.safe_load(shipped.job.read_text("utf-8"))
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
    ayane-adapter`, which records the new digests). The one trained on the retrieval prompt
    records the facts too."""
    persona_dir = CONFIGS / "personas" / provenance["job"]["config"]["persona"]
    recorded = provenance["data"]
    assert {"persona.yaml", "dialogues.jsonl", "eval.jsonl"} <= set(recorded)
    assert ("knowledge.jsonl" in recorded) == bool(provenance["job"]["config"].get("rag_share"))
    changed = {name: (digest, _sha256(persona_dir / name)) for name, digest in recorded.items()
               if _sha256(persona_dir / name) != digest}
    assert not changed, f"changed since the adapter was built (recorded, now): {changed}"


def test_the_default_variant_is_the_shipped_adapter():
    ws = Workspace.load(CONFIGS)
    variant = ws.variant()
    assert variant.name == "ayane-270m" and variant.embedded == "gemma3-270m"
    assert variant.lora_path == str((SHIPPED / "adapter.gguf").resolve())
    assert ws.variant("gemma3-270m").lora_path is None  # the plain base stays selectable
    for name, shipped in ship.SHIPPED.items():  # every shipped adapter is a variant
        assert ws.variant(name).lora_path == str((shipped.out / "adapter.gguf").resolve())
        assert ws.variant(name).embedded == "gemma3-270m"


def test_the_shipped_adapters_answer_as_ayane_and_the_base_does_not(home):
    """Greedy replies to five held-out questions, through the chat engine's gguf backend
    (the plain prompt: retrieval off, the console's default)."""
    ws = Workspace.load(CONFIGS)
    persona = ws.persona("ayane")
    questions = [q.question for q in ws.persona_data("ayane").eval[:5]]
    measured = {}
    for name in (*VARIANTS, "gemma3-270m"):
        backend = load_backend(ws.variant(name), home)
        try:
            replies = replies_from_backend(backend, persona.prompts.system, questions, 48)
        finally:
            backend.close()
        measured[name] = figures(name, replies, persona.speech)
    base = measured.pop("gemma3-270m")
    for name, ayane in measured.items():
        assert ayane.ends_maru >= 0.8 and ayane.stop_eos >= 0.8 and ayane.line_breaks == 0, name
        assert ayane.median_chars <= 45, name
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
    from pipelines.config import ExportJob, load_job

    default = ship.DEFAULT
    assert default.job == ship.REPO / "configs" / "jobs" / "quickstart-ayane-270m.yaml"
    assert default.out == ship.REPO / "configs" / "models" / "ayane-270m"
    assert default.trained == "gemma3-270m-ayane"  # the variant its job registers
    assert ship.SHIPPED["ayane-270m-rag"].trained == "gemma3-270m-ayane-rag"
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / f"{default.trained}.yaml").write_text(yaml.safe_dump(
        {"name": default.trained, "backend": "hf", "model": "models/gemma-3-270m-hf",
         "adapter": "runs/quickstart-ayane-270m/adapter", "persona": "ayane"}))
    adapter = tmp_path / "run" / "adapter"
    name = ship.peft_variant(default, home, adapter)
    written = yaml.safe_load((home / "models" / f"{name}.yaml").read_text())
    assert written["adapter"] == str(adapter) and written["model"] == "models/gemma-3-270m-hf"
    job_file = tmp_path / "export.yaml"
    job_file.write_text(yaml.safe_dump(ship.export_job(default, home, name), sort_keys=False))
    cfg = load_job(job_file)
    assert isinstance(cfg, ExportJob)
    assert cfg.variant == name and cfg.lora_only and cfg.base_gguf == ship.BASE_VARIANT
    assert cfg.output == str(home / "exports" / default.variant) and cfg.force
