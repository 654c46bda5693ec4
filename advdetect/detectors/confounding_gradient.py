"""Confounding-label gradients: Lee, Prabhushankar and AlRegib, "Gradient-Based Adversarial and
Out-of-Distribution Detection", ICML 2022 workshop, arXiv 2206.08255.

Signature: for each parameter tensor, the squared L2 norm of the gradient of the sigmoid
binary cross-entropy between the logits and the all-ones label (see
:func:`advdetect.confounding_gradient_features`). Detector: logistic regression on the
standardized log signatures, its inverse regularization ``C`` chosen by cross-validated
AUROC over folds that keep each (clean, adversarial) pair together. Needs adversarial
examples to fit.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from advdetect.detectors import register_detector
from advdetect.detectors.base import Detector
from advdetect.features import confounding_gradient_features

# Squared gradient norms span many orders of magnitude; exact zeros (a parameter the loss
# does not reach) are floored instead of becoming -inf.
_FLOOR = 1e-30


def log_features(features: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(features, _FLOOR))


@register_detector
class ConfoundingGradient(Detector):
    name = "confounding_gradient"
    needs_adversarial = True

    def __init__(self, Cs: Sequence[float] = tuple(10.0 ** np.arange(-3, 4)), cv: int = 5) -> None:
        self.Cs = Cs
        self.cv = cv

    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        return confounding_gradient_features(model, inputs, batch_size=batch_size).numpy()

    def fit(self, clean: np.ndarray, adversarial: np.ndarray) -> "ConfoundingGradient":
        n_splits = min(self.cv, len(clean), len(adversarial))
        if n_splits < 2:
            raise ValueError(f"need at least 2 clean and 2 adversarial inputs to fit; got {len(clean)} and {len(adversarial)}")
        features = np.concatenate([clean, adversarial])
        labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        paired = len(clean) == len(adversarial)
        groups = np.r_[np.arange(len(clean)), np.arange(len(adversarial)) + (0 if paired else len(clean))]
        pipeline = make_pipeline(FunctionTransformer(log_features), StandardScaler(), LogisticRegression(max_iter=5000))
        search = GridSearchCV(pipeline, {"logisticregression__C": list(self.Cs)}, cv=GroupKFold(n_splits), scoring="roc_auc")
        search.fit(features, labels, groups=groups)
        self.pipeline_: Pipeline = search.best_estimator_
        self.C_ = float(search.best_params_["logisticregression__C"])
        return self

    def score(self, signatures: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.decision_function(signatures)

    def fitted_params(self) -> dict[str, Any]:
        check_is_fitted(self, "pipeline_")
        return {"C": self.C_}
