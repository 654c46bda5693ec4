"""The detector interface: signatures from a model, then an estimator on those signatures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn


class Detector(BaseEstimator, ABC):
    """Scores inputs; higher means more likely adversarial (or out-of-distribution).

    Two steps, so that a signature is computed once per input and reused across fits:
    :meth:`signatures` maps inputs through the model to per-input arrays, and
    :meth:`fit` / :meth:`score` work on those arrays alone, like a scikit-learn estimator.
    Hyperparameters are public constructor arguments (``get_params``); fitted state ends in ``_``.
    """

    name: ClassVar[str]
    #: True when :meth:`fit` needs adversarial examples (a supervised detector).
    needs_adversarial: ClassVar[bool] = False

    @abstractmethod
    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """Per-input signatures, shape [N, D], of an eval-mode model taking inputs in [0, 1]."""

    def fit(self, clean: np.ndarray, adversarial: np.ndarray) -> "Detector":
        """Fit on signatures of clean and adversarial inputs (pairs share a row index when both
        have the same length). Detectors that need no fitting return ``self``."""
        return self

    @abstractmethod
    def score(self, signatures: np.ndarray) -> np.ndarray:
        """Scores, shape [N]: higher means more likely adversarial."""

    def fitted_params(self) -> dict[str, Any]:
        """Hyperparameters chosen during :meth:`fit`, recorded in results."""
        return {}
