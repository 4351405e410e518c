"""Stored calibrations and what they allow: the reports `kyara judge calibrate` saves
(`<home>/judges/<judge>/calibration.json`, one entry per persona and criterion, with the
judge's model and the prompt version they were made with), whether a judge is calibrated
on a criterion ("calibrated" with rho, "stale" after a prompt or model change,
"uncalibrated"), and the curate job's gate on them (`calibration_problems`).

The calibration run itself (judging the labelled rows, the agreement figures) is
`pipelines.judge.calibrate`; the runner and the console read only this module, so the run
and the runner do not import each other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.files import write_json
from pipelines.home import Home

FILE_VERSION = 1


@dataclass
class Agreement:
    n: int = 0                      # labelled rows
    scored: int = 0                 # rows with an ok verdict (the figures are over these)
    invalid: int = 0
    failed: int = 0
    spearman: float | None = None
    spearman_p: float | None = None
    spearman_weighted: float | None = None
    exact: float | None = None
    within_one: float | None = None
    mae: float | None = None
    confusion: list[list[int]] = field(default_factory=lambda: [[0] * 7 for _ in range(7)])


@dataclass
class CalibrationReport:
    judge: str
    model: str
    provider: str
    persona: str
    criterion: str
    prompt_version: str
    date: str
    few_shot: int
    seed: int
    agreement: Agreement
    # labelled rows by where they came from: {"file": n, "store": m} ({} in older files)
    sources: dict[str, int] = field(default_factory=dict)
    # verdict.judge_identity of the judge measured: server, model, sampling ("" in files
    # written before it was recorded: stale, nobody can tell which server answered)
    identity: str = ""

    @property
    def key(self) -> str:
        return f"{self.persona}/{self.criterion}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CalibrationReport:
        values = dict(data)
        values["agreement"] = Agreement(**values["agreement"])
        return cls(**values)


# --- the file the console reads --------------------------------------------------------


def calibration_path(home: str | Path, judge: str) -> Path:
    return Home(home).judges / judge / "calibration.json"


def load_calibration(home: str | Path, judge: str) -> dict[str, CalibrationReport]:
    """Every saved report of a judge, by "persona/criterion" ({} when none or unreadable:
    a damaged file only means "uncalibrated")."""
    path = calibration_path(home, judge)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {key: CalibrationReport.from_json(value)
                for key, value in data.get("reports", {}).items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def save_calibration(home: str | Path, report: CalibrationReport) -> Path:
    """Add or replace this persona/criterion's report (atomic rename)."""
    path = calibration_path(home, report.judge)
    reports = load_calibration(home, report.judge)
    reports[report.key] = report
    payload = {"version": FILE_VERSION,
               "reports": {key: value.to_json() for key, value in sorted(reports.items())}}
    return write_json(path, payload)


# --- status ----------------------------------------------------------------------------


@dataclass
class CalibrationStatus:
    state: str                        # calibrated | stale | uncalibrated
    label: str                        # short text for the console
    report: CalibrationReport | None = None


def calibration_status(home: str | Path, judge: str, persona: str, criterion: str,
                       prompt_version: str, model: str | None = None,
                       identity: str | None = None) -> CalibrationStatus:
    """Whether the judge as it is now (prompt version, model, and `identity`: the server
    and sampling, verdict.judge_identity) was calibrated: a calibration measured against
    another server or other settings is stale."""
    report = load_calibration(home, judge).get(f"{persona}/{criterion}")
    if report is None:
        return CalibrationStatus("uncalibrated", "uncalibrated")
    if report.prompt_version != prompt_version or (model is not None and report.model != model):
        return CalibrationStatus("stale", f"calibration stale (made with {report.model}, "
                                 f"{report.prompt_version})", report)
    if identity is not None and report.identity != identity:
        return CalibrationStatus("stale", "calibration stale (made against another server "
                                 "or other sampling settings)", report)
    a = report.agreement
    rho = f"ρ {a.spearman:.2f}" if a.spearman is not None else "ρ n/a"
    within = f", ±1 {a.within_one:.0%}" if a.within_one is not None else ""
    return CalibrationStatus("calibrated", f"{rho}{within} (n={a.scored}, {report.date[:10]})",
                             report)


def calibration_problems(home: str | Path, judge: Any, persona: str, criteria: Sequence[str],
                         min_agreement: float) -> list[str]:
    """The curate job's gate: one line per criterion whose calibration does not allow
    dropping data (none, stale, or rho below `min_agreement`). `judge` is a Judge (its
    name, model and criteria)."""
    out = []
    for name in criteria:
        criterion = judge.criterion(name)
        status = calibration_status(home, judge.name, persona, name, criterion.prompt_version,
                                    judge.model, judge.identity)
        rho = status.report.agreement.spearman if status.report is not None else None
        if status.state == "uncalibrated":
            out.append(f"{name}: no calibration")
        elif status.state == "stale":
            out.append(f"{name}: {status.label}")
        elif rho is None or rho < min_agreement:
            shown = "n/a" if rho is None else f"{rho:.2f}"
            out.append(f"{name}: agreement ρ {shown} is below min_agreement {min_agreement:g}")
    return out
