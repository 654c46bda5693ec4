"""advdetect: adversarial-robustness audits of image classifiers (attack, detect, report).

The public API, imported on first use so that ``import advdetect.report.document`` stays free of torch::

    result = advdetect.audit(model, (x, y), suite="default", out="reports/run1")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from advdetect.api import AuditResult, Verdict, audit
    from advdetect.detectors import DETECTORS, Detector, register_detector
    from advdetect.detectors.confounding_gradient import ConfoundingGradient
    from advdetect.detectors.confounding_gradient_agnostic import ConfoundingGradientAgnostic
    from advdetect.detectors.confounding_gradient_oneclass import ConfoundingGradientOneClass
    from advdetect.detectors.energy import EnergyScore
    from advdetect.detectors.gradnorm import GradNorm
    from advdetect.detectors.kd_bu import KernelDensityBayesianUncertainty
    from advdetect.detectors.lid import LID
    from advdetect.detectors.mahalanobis import Mahalanobis
    from advdetect.detectors.msp import MaxSoftmax
    from advdetect.detectors.odin import ODIN
    from advdetect.errors import ExitCode, UsageError
    from advdetect.signatures.features import confounding_gradient_features
    from advdetect.run.records import AttackRecord, ResultRow
    from advdetect.config.suite import Suite, load_suite

__version__ = "0.1.0"

_EXPORTS = {
    "audit": "advdetect.api", "AuditResult": "advdetect.api", "Verdict": "advdetect.api",
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
