"""A plan: named terms per place (gpu / host) against a budget, and its verdict. When a
place is over budget the plan names its largest term and what to change so it fits: naming
the term is the point — "out of memory" alone does not tell the user which knob to turn.

An `Estimator` makes the plans of one or more job kinds; `pipelines.plan.ESTIMATORS` holds
one per kind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.plan.budget import Budget
from pipelines.plan.units import human


@dataclass
class Term:
    name: str
    bytes: int
    note: str = ""
    floor: int | None = None  # what the term shrinks to with its remedy; None: fixed


@dataclass
class Plan:
    job: str
    device: str                              # where the heavy work runs: cpu | cuda
    gpu: list[Term] = field(default_factory=list)
    host: list[Term] = field(default_factory=list)
    budget: Budget | None = None
    # per place, what to change when that place is over budget, keyed by term name
    remedies: dict[str, Any] = field(default_factory=dict)  # text, or f(room) -> text
    notes: list[str] = field(default_factory=list)
    margin: float = 1.0  # the share of each budget the job may use (train: memory.MARGIN)

    @property
    def gpu_peak(self) -> int:
        return sum(t.bytes for t in self.gpu)

    @property
    def host_peak(self) -> int:
        return sum(t.bytes for t in self.host)

    def over(self) -> list[tuple[str, int, int]]:
        """(place, peak, budget) for each place over its budget."""
        if self.budget is None:
            return []
        found = []
        if self.gpu:
            if self.budget.gpu is None:
                found.append(("gpu", self.gpu_peak, 0))
            elif self.gpu_peak > self.usable(self.budget.gpu):
                found.append(("gpu", self.gpu_peak, self.usable(self.budget.gpu)))
        if self.host_peak > self.usable(self.budget.host):
            found.append(("host", self.host_peak, self.usable(self.budget.host)))
        return found

    def usable(self, limit: int) -> int:
        return int(limit * self.margin)

    @property
    def fits(self) -> bool:
        return not self.over()

    def breaking_term(self, place: str) -> Term:
        terms = self.gpu if place == "gpu" else self.host
        return max(terms, key=lambda t: t.bytes)

    def fixing_term(self, place: str, peak: int, limit: int) -> tuple[Term, bool]:
        """The term whose remedy alone brings `place` under `limit` (the largest saving
        first), else the largest term."""
        terms = self.gpu if place == "gpu" else self.host
        for term in sorted(terms, key=lambda t: t.bytes - (t.floor or t.bytes), reverse=True):
            if term.floor is not None and peak - term.bytes + term.floor <= limit:
                return term, True
        return self.breaking_term(place), False

    def verdict(self) -> str:
        """One line: fits, or which term breaks which budget and what would fit."""
        problems = self.over()
        if not problems:
            return (f"fits: GPU {human(self.gpu_peak)}, host {human(self.host_peak)}"
                    if self.gpu else f"fits: host {human(self.host_peak)}")
        parts = []
        for place, peak, limit in problems:
            if place == "gpu" and self.budget and self.budget.gpu is None:
                parts.append(f"needs a GPU ({human(peak)}) and none was found; "
                             f"{self.remedies.get('no_gpu', 'run it on a GPU machine')}")
                continue
            term, fits = self.fixing_term(place, peak, limit)
            fix = self.remedies.get(term.name) or ""
            if callable(fix):
                fix = fix(limit - (peak - term.bytes))
            fix = fix if fits else f"no single change fits; {fix}" if fix else ""
            parts.append(f"{place} peak {human(peak)} > {human(limit)}: term "
                         f"'{term.name}' {human(term.bytes)}" + (f"; {fix}" if fix else ""))
        return "does not fit: " + " | ".join(parts)

    def events(self) -> Iterator[Any]:
        """The plan as a job's events: its lines as logs, the predicted peaks as metrics."""
        from pipelines import events as ev

        for line in self.lines():
            yield ev.log(line)
        yield ev.metric("predicted_host_bytes", self.host_peak, stage="plan")
        if self.gpu:
            yield ev.metric("predicted_gpu_bytes", self.gpu_peak, stage="plan")

    def lines(self) -> list[str]:
        out = [f"{self.job} on {self.device}"]
        for place, terms, peak, limit in (
            ("GPU", self.gpu, self.gpu_peak, self.budget.gpu if self.budget else None),
            ("host", self.host, self.host_peak, self.budget.host if self.budget else None),
        ):
            if not terms:
                continue
            where = f" of {human(limit)}" if limit else ""
            if limit and self.margin < 1:
                where += f" ({self.margin:.0%} usable: {human(self.usable(limit))})"
            out.append(f"{place} peak {human(peak)}{where}")
            out.extend(f"  {t.name:<28} {human(t.bytes):>11}  {t.note}" for t in terms)
        out.extend(f"note: {n}" for n in self.notes)
        out.append(self.verdict())
        return out


# (cfg, workspace or None, budget or None, base_dir or None) -> the job's plans
EstimateFn = Callable[[Any, Any, Budget | None, Path | None], list[Plan]]


@dataclass(frozen=True)
class Estimator:
    """The memory estimate of the job kinds in `kinds`. `needs_workspace`: whether it
    resolves variants or paths through the workspace (`kyara plan` loads it then)."""

    kinds: tuple[str, ...]
    estimate: EstimateFn
    needs_workspace: bool = True
