"""advdetect: adversarial-robustness audits of image classifiers (attack, detect, report).

The public API, imported on first use so that ``import advdetect.report.document`` stays free of torch::

    result = advdetect.audit(model, (x, y), suite="default", out="reports/run1")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ``X as X``: re-exported names, which ``__getattr__`` below imports on first use
    from advdetect.api import AuditResult as AuditResult, audit as audit
    from advdetect.config.suite import Suite as Suite, load_suite as load_suite
    from advdetect.detectors import (DETECTORS as DETECTORS, Detector as Detector,
                                     register_detector as register_detector)
    from advdetect.detectors.confounding_gradient import ConfoundingGradient as ConfoundingGradient
    from advdetect.detectors.confounding_gradient_agnostic import (
        ConfoundingGradientAgnostic as ConfoundingGradientAgnostic)
    from advdetect.detectors.confounding_gradient_oneclass import (
        ConfoundingGradientOneClass as ConfoundingGradientOneClass)
    from advdetect.detectors.energy import EnergyScore as EnergyScore
    from advdetect.detectors.gradnorm import GradNorm as GradNorm
    from advdetect.detectors.kd_bu import KernelDensityBayesianUncertainty as KernelDensityBayesianUncertainty
    from advdetect.detectors.lid import LID as LID
    from advdetect.detectors.mahalanobis import Mahalanobis as Mahalanobis
    from advdetect.detectors.msp import MaxSoftmax as MaxSoftmax
    from advdetect.detectors.odin import ODIN as ODIN
    from advdetect.errors import ExitCode as ExitCode, UsageError as UsageError
    from advdetect.run.checks import Verdict as Verdict
    from advdetect.run.records import AttackRecord as AttackRecord, ResultRow as ResultRow
    from advdetect.signatures.features import confounding_gradient_features as confounding_gradient_features

__version__ = "0.1.0"

_EXPORTS = {
    "audit": "advdetect.api", "AuditResult": "advdetect.api", "Verdict": "advdetect.run.checks",
    "load_suite": "advdetect.config.suite", "Suite": "advdetect.config.suite",
    "DETECTORS": "advdetect.detectors", "Detector": "advdetect.detectors", "register_detector": "advdetect.detectors",
    # the detectors, standalone: ``advdetect.Mahalanobis(model).fit(loader)``, then ``detector(x)``
    "ConfoundingGradient": "advdetect.detectors.confounding_gradient",
    "ConfoundingGradientAgnostic": "advdetect.detectors.confounding_gradient_agnostic",
    "ConfoundingGradientOneClass": "advdetect.detectors.confounding_gradient_oneclass",
    "EnergyScore": "advdetect.detectors.energy", "GradNorm": "advdetect.detectors.gradnorm",
    "KernelDensityBayesianUncertainty": "advdetect.detectors.kd_bu", "LID": "advdetect.detectors.lid",
    "Mahalanobis": "advdetect.detectors.mahalanobis", "MaxSoftmax": "advdetect.detectors.msp",
    "ODIN": "advdetect.detectors.odin",
    "confounding_gradient_features": "advdetect.signatures.features",
    "AttackRecord": "advdetect.run.records", "ResultRow": "advdetect.run.records",
    "ExitCode": "advdetect.errors", "UsageError": "advdetect.errors",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'advdetect' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
