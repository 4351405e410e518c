"""The shape of pipelines.config: every field of every schema described (so `kyara config
check` and the README can show them), one module per topic, the train and prefer jobs'
shared fields declared once, and the variant and job unions discriminated on their tag."""

from __future__ import annotations

import importlib
import pkgutil
import typing
from pathlib import Path

from pydantic import BaseModel, TypeAdapter

import pipelines.config as config
from pipelines.config import (
    JOB_KINDS,
    VARIANT_BACKENDS,
    AdapterJob,
    HFVariant,
    Job,
    PreferJob,
    TrainJob,
    Variant,
)


def _config_modules() -> list[object]:
    return [config] + [importlib.import_module(f"pipelines.config.{m.name}")
                       for m in pkgutil.iter_modules(config.__path__)]


def _models() -> set[type[BaseModel]]:
    found = set()
    for module in _config_modules():
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, BaseModel)
                    and value.__module__.startswith("pipelines.config")):
                found.add(value)
    return found


def test_the_walk_finds_the_schemas():
    names = {m.__name__ for m in _models()}
    assert {"AppSettings", "Keymap", "Persona", "HFVariant", "JudgeConfig", "TrainJob",
            "PreferJob", "EvalJob", "LoraSettings", "AdapterJob"} <= names


def test_every_field_of_every_schema_is_described():
    undescribed = sorted(f"{model.__module__}.{model.__name__}.{name}"
                         for model in _models()
                         for name, field in model.model_fields.items()
                         if not (field.description or "").strip())
    assert undescribed == []


def test_no_config_module_passes_700_lines():
    for path in Path(config.__file__).parent.glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 700, path.name


def test_every_public_name_is_importable_from_the_package():
    for name in config.__all__:
        assert hasattr(config, name), name


def test_train_and_prefer_declare_their_shared_fields_once():
    shared = set(TrainJob.model_fields) & set(PreferJob.model_fields)
    assert issubclass(TrainJob, AdapterJob) and issubclass(PreferJob, AdapterJob)
    assert set(AdapterJob.model_fields) <= shared
    for name in AdapterJob.model_fields:
        if name not in TrainJob.__annotations__ and name not in PreferJob.__annotations__:
            continue
        # redeclared only where the meaning or the default differs
        assert name in {"job", "base"}, name
    # job is still the first key, as job files must have it
    assert next(iter(TrainJob.model_fields)) == next(iter(PreferJob.model_fields)) == "job"


def test_variants_and_jobs_are_discriminated_unions():
    assert set(VARIANT_BACKENDS) == {"hf", "gguf", "openai"}
    assert list(JOB_KINDS)[:3] == ["train", "curate", "prefer"]
    variant = TypeAdapter(Variant).validate_python({"name": "v", "backend": "hf", "model": "m"})
    assert isinstance(variant, HFVariant)
    job = TypeAdapter(Job).validate_python({"job": "prefer", "name": "p", "base": "b",
                                            "data": "d.jsonl"})
    assert isinstance(job, PreferJob)
    for union, tag in ((Variant, "backend"), (Job, "job")):
        assert typing.get_args(union)[1].discriminator == tag
