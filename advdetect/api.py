"""The Python API: an audit of an ``nn.Module`` on tensors (or of specs), as one call.

    >>> result = advdetect.audit(model, (x, y), suite="default", out="reports/run1")
    >>> result.rows[0].auroc, result.verdict, result.report_html
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from advdetect.run.checks import FAILED, PASSED, SKIPPED, Outcome, evaluate, plan_checks
from advdetect.stages.pipeline import run_audit
from advdetect.stages.preflight import build_options
from advdetect.run.records import AttackRecord, ResultRow
from advdetect.config.suite import Suite


@dataclass(frozen=True)
class Verdict:
    """The suite's threshold checks on one audit, as ``advdetect check`` prints them."""

    outcomes: tuple[Outcome, ...]

    @property
    def passed(self) -> bool:
        """True when no check failed (skipped checks do not fail, as in pytest)."""
        return not any(o.status == FAILED for o in self.outcomes)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def __str__(self) -> str:
        return f"{self.count(PASSED)} passed, {self.count(FAILED)} failed, {self.count(SKIPPED)} skipped"


@dataclass(frozen=True)
class AuditResult:
    """What an audit produced: its run folder, typed rows and cells, and the verdict of the suite's
    thresholds (None when the suite sets none)."""

    run_dir: Path
    document: dict[str, Any]
    verdict: Verdict | None

    @property
    def rows(self) -> list[ResultRow]:
        """One row per cell x detector x protocol, as in ``results.json``."""
        return [ResultRow.from_dict(row) for row in self.document["results"]]

    @property
    def attacks(self) -> list[AttackRecord]:
        """One record per cell: attack success rate and perturbation sizes."""
        return [AttackRecord.from_dict(record) for record in self.document["attacks"]]

    @property
    def clean_accuracy(self) -> float:
        return float(self.document["clean_accuracy"])

    @property
    def report_html(self) -> Path:
        return self.run_dir / "report.html"

    @property
    def report_pdf(self) -> Path:
        return self.run_dir / "report.pdf"

    @property
    def results_json(self) -> Path:
        return self.run_dir / "results.json"


def audit(model: nn.Module | str = "default", data: tuple[torch.Tensor, torch.Tensor] | str = "default", *,
          suite: str | Suite = "default", out: str | Path | None = None, attacks: Sequence[str] | None = None,
          detectors: Sequence[str] | None = None, n: int | None = 256, n_reference: int = 256, seed: int = 0,
          device: str = "auto", batch_size: int = 128, fit_fraction: float = 0.2, fit_folds: int = 0,
          noisy_negatives: bool = False, cache_dir: str | Path | None = None, cache: bool = True, **model_options: Any) -> AuditResult:
    """Audit ``model`` (an ``nn.Module`` taking inputs in [0, 1], or a model spec) on ``data`` (images
    [N, C, H, W] in [0, 1] and labels, or a data spec) with ``suite`` into the run folder ``out``
    (default ``reports/<timestamp>``). The keywords are the command line's audit options;
    ``model_options`` takes ``weights``, ``mean``/``std`` and the RobustBench ones. Bad input raises
    :class:`advdetect.UsageError` before any work."""
    options = build_options(suite, attacks=attacks, model=model, data=data, n=n, n_reference=n_reference, seed=seed,
                            device=device, batch_size=batch_size, fit_fraction=fit_fraction, fit_folds=fit_folds,
                            detectors=detectors,
                            noisy_negatives=noisy_negatives, cache_dir=cache_dir, cache=cache, **model_options)
    checks = plan_checks(options.suite, options.detector_names())
    run_dir, document = run_audit(options, None if out is None else Path(out))
    verdict = Verdict(tuple(evaluate(check, document) for check in checks)) if checks else None
    return AuditResult(run_dir, document, verdict)
