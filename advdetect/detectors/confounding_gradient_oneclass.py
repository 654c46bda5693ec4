"""Confounding-label gradients without adversarial examples: the signature of Lee, Prabhushankar
and AlRegib, "Gradient-Based Adversarial and Out-of-Distribution Detection", ICML 2022 workshop,
arXiv 2206.08255, scored by its distance from clean inputs.

Fit on clean signatures only: a Gaussian in the standardized log-signature space (mean and
Ledoit-Wolf shrunk covariance, since reference sets are small next to the number of parameter
tensors). The score is the Mahalanobis distance. What an audit of a new, unknown attack needs.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from advdetect.detectors import register_detector
from advdetect.detectors.confounding_gradient import ConfoundingSignatures, log_features, log_features_torch


@register_detector
class ConfoundingGradientOneClass(ConfoundingSignatures):
    name = "confounding_gradient_oneclass"

    def fit_signatures(self, clean: np.ndarray, adversarial: np.ndarray | None = None) -> ConfoundingGradientOneClass:
        if len(clean) < 2:
            raise ValueError(f"need at least 2 clean inputs to fit; got {len(clean)}")
        features = log_features(clean)
        self.scaler_ = StandardScaler().fit(features)
        self.gaussian_ = LedoitWolf().fit(self.scaler_.transform(features))
        return self

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "gaussian_")
        return self.gaussian_.mahalanobis(self.scaler_.transform(log_features(signatures)))

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The squared Mahalanobis distance of :meth:`score_samples` in torch operations."""
        check_is_fitted(self, "gaussian_")
        features = log_features_torch(self.torch_signatures(model, inputs))

        def constant(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.float64, device=features.device)

        centered = (features - constant(self.scaler_.mean_)) / constant(self.scaler_.scale_) \
            - constant(self.gaussian_.location_)
        return ((centered @ constant(self.gaussian_.get_precision())) * centered).sum(dim=1)
