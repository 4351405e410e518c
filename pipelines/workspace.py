"""The user's configuration tree (`configs/`) as one object: where it is, what it holds,
and a check of every file in it.

Resolution of the configs directory: an explicit argument, else `KYARA_CONFIGS`, else
`./configs` when the current directory has one, else the `configs/` shipped beside the
package (the embedded default persona and model).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import (
    AppSettings,
    CalibrationRow,
    ConfigError,
    Criterion,
    Dialogue,
    EvalQuestion,
    JudgeConfig,
    KnowledgeFact,
    Persona,
    Probe,
    Scenario,
    Script,
    Variant,
    apply_env,
    load_job,
    load_jsonl,
    load_variant,
    load_yaml,
    read_yaml,
)
from pipelines.home import Home, ensure_private_home

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PERSONA_FILES = {
    "knowledge.jsonl": KnowledgeFact,
    "dialogues.jsonl": Dialogue,
    "eval.jsonl": EvalQuestion,
    "calibration.jsonl": CalibrationRow,
    # the eval job's held-out sets: never training data
    "probes.jsonl": Probe,
    "scripts.jsonl": Script,
    "scenarios.jsonl": Scenario,
}


def find_configs_dir(explicit: str | Path | None = None) -> Path:
    """The configs/ to load: the one named (`--configs`), else `KYARA_CONFIGS`, else this
    checkout's. A configs/ in the current directory is never taken on its own (on a shared
    server anyone may leave one, pointing `llama_cpp_dir:` at scripts the export runs):
    when one is there, one line on stderr says it is not used and how to use it."""
    if explicit:
        return Path(explicit)
    if os.environ.get("KYARA_CONFIGS"):
        return Path(os.environ["KYARA_CONFIGS"])
    here = Path.cwd() / "configs"
    if (here / "kyara.yaml").is_file() and here.resolve() != PACKAGED_CONFIGS.resolve():
        _say_once(f"kyara: not using {here} (a configs/ in the current directory is taken "
                  f"only when named: KYARA_CONFIGS={here} or --configs {here})")
    return PACKAGED_CONFIGS


_SAID: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr)


@dataclass
class PersonaData:
    persona: Persona
    knowledge: list[KnowledgeFact]
    dialogues: list[Dialogue]
    eval: list[EvalQuestion]
    calibration: list[CalibrationRow]
    probes: list[Probe] = field(default_factory=list)
    scripts: list[Script] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)


@dataclass
class CheckResult:
    path: Path
    error: str | None = None
    kind: str = ""


@dataclass
class Workspace:
    configs: Path
    settings: AppSettings = field(default_factory=AppSettings)

    @classmethod
    def load(cls, configs: str | Path | None = None) -> Workspace:
        root = find_configs_dir(configs)
        if not root.is_dir():
            raise ConfigError(f"{root}: configs directory not found (set KYARA_CONFIGS)")
        app_file = root / "kyara.yaml"
        settings = apply_env(load_yaml(app_file, AppSettings) if app_file.exists()
                             else AppSettings())
        try:  # made 0700 when missing; an open one is named once, fixed only when asked
            problem = ensure_private_home(settings.home_path())
        except OSError as exc:
            raise ConfigError(f"home: cannot create {settings.home_path()}: "
                              f"{exc.strerror or exc}") from None
        if problem and sys.stderr.isatty():  # for a person at a terminal; doctor tells all
            _say_once(f"kyara: {problem}")
        return cls(configs=root, settings=settings)

    # --- listing ---------------------------------------------------------------------

    def persona_names(self) -> list[str]:
        base = self.configs / "personas"
        return sorted(p.parent.name for p in base.glob("*/persona.yaml")) if base.is_dir() else []

    def variant_files(self) -> dict[str, Path]:
        """configs/models/*.yaml, then the variants that jobs wrote into <home>/models/
        (trained adapters); a configs/ file of the same name wins: it is the user's own."""
        files = _yaml_files(self.configs / "models")
        for name, path in _yaml_files(Home(self.settings.home_path()).models).items():
            files.setdefault(name, path)
        return files

    def judge_files(self) -> dict[str, Path]:
        return _yaml_files(self.configs / "judges")

    def criterion_files(self) -> dict[str, Path]:
        return _yaml_files(self.configs / "judges" / "criteria")

    def job_files(self) -> dict[str, Path]:
        return _yaml_files(self.configs / "jobs")

    # --- loading ---------------------------------------------------------------------

    def persona_dir(self, name: str) -> Path:
        path = self.configs / "personas" / name
        if not (path / "persona.yaml").is_file():
            known = ", ".join(self.persona_names()) or "none"
            raise ConfigError(f"persona '{name}' not found in {path.parent} (known: {known})")
        return path

    def persona(self, name: str | None = None) -> Persona:
        name = name or self.settings.default_persona
        persona = load_yaml(self.persona_dir(name) / "persona.yaml", Persona)
        if persona.id != name:
            raise ConfigError(
                f"{self.persona_dir(name) / 'persona.yaml'}: id: expected '{name}' "
                f"(the directory name), found '{persona.id}'"
            )
        return persona

    def persona_data(self, name: str | None = None) -> PersonaData:
        name = name or self.settings.default_persona
        folder = self.persona_dir(name)
        loaded: dict[str, list[Any]] = {}
        for filename, model in PERSONA_FILES.items():
            path = folder / filename
            loaded[filename] = load_jsonl(path, model) if path.exists() else []
        return PersonaData(
            persona=self.persona(name),
            knowledge=loaded["knowledge.jsonl"],
            dialogues=loaded["dialogues.jsonl"],
            eval=loaded["eval.jsonl"],
            calibration=loaded["calibration.jsonl"],
            probes=loaded["probes.jsonl"],
            scripts=loaded["scripts.jsonl"],
            scenarios=loaded["scenarios.jsonl"],
        )

    def variant(self, name: str | None = None) -> Variant:
        name = name or self.settings.default_variant
        files = self.variant_files()
        if name not in files:
            known = ", ".join(files) or "none"
            raise ConfigError(f"model variant '{name}' not found in {self.configs / 'models'} "
                              f"or {Home(self.settings.home_path()).models} (known: {known})")
        return _variant_at(name, files[name])

    def judge(self, name: str | None = None) -> JudgeConfig:
        name = name or self.settings.default_judge
        files = self.judge_files()
        if not name or name not in files:
            known = ", ".join(files) or "none"
            raise ConfigError(f"judge '{name}' not found in {self.configs / 'judges'} "
                              f"(known: {known})")
        return load_yaml(files[name], JudgeConfig)

    # --- every file of a kind: the good ones, and one line per bad one -------------------
    # One malformed file never stops the console: it is left out and named in one line
    # (a notification in the console, a line in `kyara doctor`).

    def variants(self) -> tuple[dict[str, Variant], list[str]]:
        return _load_each(self.variant_files(), _variant_at)

    def judges(self) -> tuple[dict[str, JudgeConfig], list[str]]:
        return _load_each(self.judge_files(), lambda _, p: load_yaml(p, JudgeConfig))

    def criteria(self) -> tuple[dict[str, Criterion], list[str]]:
        return _load_each(self.criterion_files(), lambda _, p: load_yaml(p, Criterion))

    def loaded_jobs(self) -> tuple[dict[str, tuple[Path, Any]], list[str]]:
        """name -> (path, job config) for the job files that load; one line per file that
        does not. Which of them can run is pipelines.jobs.offered_jobs's answer."""
        files = self.job_files()
        good, problems = _load_each(files, lambda _, p: load_job(p))
        return {name: (files[name], cfg) for name, cfg in good.items()}, problems

    def jobs(self) -> tuple[dict[str, Path], list[str]]:
        """The job files that load (name -> path: what launching takes), and the others."""
        loaded, problems = self.loaded_jobs()
        return {name: path for name, (path, _) in loaded.items()}, problems

    def problems(self) -> list[str]:
        """One line per variant, judge, criterion or job file that does not load."""
        return [line for kind in (self.variants, self.judges, self.criteria, self.jobs)
                for line in kind()[1]]

    # --- checking --------------------------------------------------------------------

    def check(self, paths: list[Path] | None = None) -> list[CheckResult]:
        """Validate the given files (or every file under configs/); never raises for a bad
        file: each result carries its one-line error."""
        targets = [Path(p) for p in paths] if paths else self._all_files()
        results: list[CheckResult] = []
        for target in targets:
            if target.is_dir():
                results.extend(Workspace(configs=target, settings=self.settings).check())
                continue
            kind, checker = self._checker_for(target)
            try:
                checker(target)
                results.append(CheckResult(target, None, kind))
            except ConfigError as exc:
                results.append(CheckResult(target, str(exc), kind))
        if not paths:
            results.extend(self._cross_checks())
        return results

    def _all_files(self) -> list[Path]:
        files: list[Path] = []
        if (self.configs / "kyara.yaml").exists():
            files.append(self.configs / "kyara.yaml")
        for name in self.persona_names():
            folder = self.configs / "personas" / name
            files.append(folder / "persona.yaml")
            files.extend(folder / f for f in PERSONA_FILES if (folder / f).exists())
        for group in (self.variant_files(), self.judge_files(), self.criterion_files(),
                      self.job_files()):
            files.extend(group.values())
        return files

    def _checker_for(self, path: Path) -> tuple[str, Callable[[Path], Any]]:
        parent = path.parent.name
        if path.name == "kyara.yaml":
            return "app", lambda p: load_yaml(p, AppSettings)
        if path.name == "persona.yaml":
            return "persona", lambda p: load_yaml(p, Persona)
        if path.name in PERSONA_FILES:
            model = PERSONA_FILES[path.name]
            return path.stem, lambda p: load_jsonl(p, model)
        if parent == "models":
            return "variant", load_variant
        if parent == "criteria":
            return "criterion", lambda p: load_yaml(p, Criterion)
        if parent == "judges":
            return "judge", lambda p: load_yaml(p, JudgeConfig)
        if parent == "jobs":
            return "job", load_job
        return "unknown", _guess_and_load

    def _cross_checks(self) -> list[CheckResult]:
        """References between files: defaults and judges' criteria must exist."""
        out: list[CheckResult] = []
        app = self.configs / "kyara.yaml"
        s = self.settings
        if s.default_persona not in self.persona_names():
            out.append(CheckResult(app, f"{app}: default_persona: expected one of "
                                        f"{self.persona_names()}, found '{s.default_persona}'"))
        if s.default_variant not in self.variant_files():
            out.append(CheckResult(app, f"{app}: default_variant: expected one of "
                                        f"{list(self.variant_files())}, found '{s.default_variant}'"))
        if s.default_judge and s.default_judge not in self.judge_files():
            out.append(CheckResult(app, f"{app}: default_judge: expected one of "
                                        f"{list(self.judge_files())}, found '{s.default_judge}'"))
        criteria = set(self.criterion_files())
        for path in self.judge_files().values():
            try:
                judge = load_yaml(path, JudgeConfig)
            except ConfigError:
                continue  # already reported by the file check
            missing = [c for c in judge.criteria if c not in criteria]
            if missing:
                out.append(CheckResult(path, f"{path}: criteria: expected criteria defined in "
                                             f"judges/criteria/, found unknown {missing}"))
        return out


def _variant_at(name: str, path: Path) -> Variant:
    variant = load_variant(path)
    if variant.name != name:
        raise ConfigError(f"{path}: name: expected '{name}' (the file name), "
                          f"found '{variant.name}'")
    return variant


def _load_each(files: dict[str, Path], load: Callable[[str, Path], Any]
               ) -> tuple[dict[str, Any], list[str]]:
    good: dict[str, Any] = {}
    problems: list[str] = []
    for name, path in files.items():
        try:
            good[name] = load(name, path)
        except ConfigError as exc:
            problems.append(" ".join(str(exc).split()))  # one line, whatever the message
    return good, problems


def _yaml_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def _guess_and_load(path: Path) -> Any:
    """A file outside the known folders: pick the schema from its keys."""
    data = read_yaml(path)
    if isinstance(data, dict) and "job" in data:
        return load_job(path)
    if isinstance(data, dict) and "backend" in data:
        return load_variant(path)
    if isinstance(data, dict) and "provider" in data:
        return load_yaml(path, JudgeConfig)
    if isinstance(data, dict) and "template" in data:
        return load_yaml(path, Criterion)
    if isinstance(data, dict) and "profile" in data:
        return load_yaml(path, Persona)
    return load_yaml(path, AppSettings)
