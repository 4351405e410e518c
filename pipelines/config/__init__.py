"""Typed configuration: the pydantic schemas for everything under `configs/`, and loaders
whose errors fit on one line and name the file, the key path, what was expected and what
was found.

Every model forbids unknown keys: a typo in a YAML file is an error, not a silently
ignored setting. One module per topic; every public name is importable from here:

- `errors`: ConfigError and the one-line form of a validation error
- `readers`: text, YAML and JSON Lines into models (`load_yaml`, `load_jsonl`, ...)
- `base`: `Strict` (unknown keys refused), the shared name patterns and defaults
- `settings`: configs/kyara.yaml (`AppSettings`, `Keymap`)
- `persona`: a persona's files (persona.yaml and its JSON Lines)
- `variants`: configs/models/ (`Variant`, a discriminated union on `backend:`)
- `judges`: configs/judges/ and their criteria
- `train_jobs`: the train and prefer jobs (`AdapterJob`, what both take)
- `jobs`: the other job kinds, `Job` (a discriminated union on `job:`) and `load_job`
"""

from __future__ import annotations

from pipelines.config.base import DEFAULT_JUDGE, DEFAULT_PERSONA, VARIANT_NAME, Strict
from pipelines.config.errors import ConfigError, format_validation_error
from pipelines.config.jobs import (
    EVAL_SETS,
    JOB_KINDS,
    CurateJob,
    EvalJob,
    EvolveFitness,
    EvolveJob,
    ExportJob,
    IndexJob,
    Job,
    MergeJob,
    MergeOptions,
    load_job,
    parse_job,
)
from pipelines.config.judges import Criterion, JudgeConfig, JudgePrices
from pipelines.config.persona import (
    PROBE_KINDS,
    CalibrationRow,
    ChatMessage,
    Dialogue,
    EvalQuestion,
    KnowledgeFact,
    Persona,
    PersonaPrompts,
    Probe,
    ProbeKind,
    Scenario,
    Script,
    SpeechRules,
)
from pipelines.config.readers import (
    iter_jsonl,
    load_jsonl,
    load_yaml,
    read_text,
    read_yaml,
    validate,
    validate_tagged,
)
from pipelines.config.settings import AppSettings, Keymap, apply_env
from pipelines.config.train_jobs import (
    AdapterJob,
    LoraSettings,
    PairSettings,
    PreferJob,
    TrainJob,
    fsdp_sharded,
)
from pipelines.config.variants import (
    VARIANT_BACKENDS,
    Generation,
    GGUFVariant,
    HFVariant,
    OpenAIVariant,
    Variant,
    load_variant,
    parse_variant,
)

__all__ = [
    "DEFAULT_JUDGE", "DEFAULT_PERSONA", "EVAL_SETS", "JOB_KINDS", "PROBE_KINDS",
    "VARIANT_BACKENDS", "VARIANT_NAME",
    "AdapterJob", "AppSettings", "CalibrationRow", "ChatMessage", "ConfigError", "Criterion",
    "CurateJob", "Dialogue", "EvalJob", "EvalQuestion", "EvolveFitness", "EvolveJob",
    "ExportJob", "GGUFVariant", "Generation", "HFVariant", "IndexJob", "Job", "JudgeConfig",
    "JudgePrices", "Keymap", "KnowledgeFact", "LoraSettings", "MergeJob", "MergeOptions",
    "OpenAIVariant", "PairSettings", "Persona", "PersonaPrompts", "PreferJob", "Probe",
    "ProbeKind", "Scenario", "Script", "SpeechRules", "Strict", "TrainJob", "Variant",
    "apply_env", "format_validation_error", "fsdp_sharded", "iter_jsonl", "load_job",
    "load_jsonl", "load_variant", "load_yaml", "parse_job", "parse_variant", "read_text",
    "read_yaml", "validate", "validate_tagged",
]
