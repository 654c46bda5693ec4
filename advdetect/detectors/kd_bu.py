"""Kernel density and Bayesian uncertainty: Feinman, Curtin, Shintre and Gardner, "Detecting
Adversarial Samples from Artifacts", 2017, arXiv 1703.00410.

Kernel density (KD): the log Gaussian kernel density of the penultimate features under the
clean reference inputs of the predicted class. Bayesian uncertainty (BU): the variance of
Monte Carlo dropout predictions, ``mean_t |p_t|^2 - |mean_t p_t|^2``. The paper's networks
have dropout layers; to work on any model, dropout (p = 0.5, seeded) is applied here to the
penultimate features feeding the final linear layer, with the same 50 masks for every input. A
logistic regression on the
standardized (KD, BU) pair detects, as in the paper; the kernel bandwidth, which the paper
fixes per dataset, is chosen on the calibration split from multiples of the median distance
between reference features. Needs adversarial examples to fit.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch import nn

from advdetect.signatures.activations import PlainForward, final_linear, penultimate, plain_forward, recording
from advdetect.detectors import register_detector
from advdetect.detectors.base import (DEFAULT_CS, NON_NEGATIVE, Bounds, Detector, best_by_cv, fit_logistic,
                                      logistic_torch,
                                     require_adversarial)


def log_kernel_density(features: torch.Tensor, reference: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Mean Gaussian kernel ``exp(-|x - r|^2 / bandwidth^2)`` over the reference rows, as a log (per input)."""
    return _log_mean_kernel(torch.cdist(features, reference).pow(2), bandwidth)


def _log_mean_kernel(squared: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """:func:`log_kernel_density` from the squared distances [N, R] to the reference rows."""
    return torch.logsumexp(-squared / bandwidth**2, dim=1) - np.log(squared.shape[1])


@register_detector
class KernelDensityBayesianUncertainty(Detector):
    name = "kd_bu"
    needs_adversarial = True
    uses_adversarial = True
    plain_forward_only = True
    bounds = {**Detector.bounds, "dropout": Bounds(0, below=1), "seed": NON_NEGATIVE}

    def __init__(self, model: nn.Module | None = None, bandwidth_factors: Sequence[float] = (0.25, 0.5, 1.0),
                 dropout: float = 0.5, dropout_samples: int = 50, Cs: Sequence[float] = DEFAULT_CS, cv: int = 5,
                 seed: int = 0) -> None:
        self.model = model
        self.bandwidth_factors = bandwidth_factors
        self.dropout = dropout
        self.dropout_samples = dropout_samples
        self.Cs = Cs
        self.cv = cv
        self.seed = seed

    def prepare(self, model: nn.Module, reference: torch.Tensor, labels: torch.Tensor, *,
                batch_size: int = 64) -> KernelDensityBayesianUncertainty:
        _, features = penultimate(model, reference, batch_size)
        self.reference_ = features
        self.reference_labels_ = labels.clone()
        distances = torch.pdist(features)
        self.median_distance_ = float(distances.median()) if len(distances) else 1.0
        return self


    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        check_is_fitted(self, "reference_")
        return self.forward_signatures(model, plain_forward(model, inputs, batch_size))

    def forward_signatures(self, model: nn.Module, forward: PlainForward) -> np.ndarray:
        check_is_fitted(self, "reference_")
        return self._columns(model, forward.logits.double(), forward.penultimate(), self.bandwidth_factors).numpy()

    def _columns(self, model: nn.Module, logits: torch.Tensor, features: torch.Tensor,
                 factors: Sequence[float]) -> torch.Tensor:
        """[N, len(factors) + 1]: KD for each bandwidth factor, then BU, from the logits and the
        penultimate features (float64, on any device; differentiable in the features)."""
        predicted = logits.argmax(dim=1)
        reference, reference_labels = self.reference_.to(features.device), self.reference_labels_.to(features.device)
        densities = [torch.full((len(features),), -np.inf, dtype=torch.float64, device=features.device)
                     for _ in factors]
        for c in predicted.unique():
            rows, same_class = predicted == c, reference[reference_labels == c]
            if len(same_class):
                squared = torch.cdist(features[rows], same_class).pow(2)  # once for every bandwidth
                for density, factor in zip(densities, factors):
                    density[rows] = _log_mean_kernel(squared, factor * self.median_distance_)
        columns = [density.clamp(min=-1e6) for density in densities]
        columns.append(self._uncertainty(model, features))
        return torch.stack(columns, dim=1)

    def _uncertainty(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        last = final_linear(model)
        weight, bias = last.weight.detach().to(features), None if last.bias is None else last.bias.detach().to(features)
        # The same seeded masks for every input, so that an input's uncertainty does not depend on
        # which other inputs share its batch (or, in a distributed audit, its rank).
        generator = torch.Generator().manual_seed(self.seed)
        keep = torch.rand((self.dropout_samples, features.shape[1]), generator=generator, dtype=torch.float64)
        # every mask's features at once ((x / (1 - p)) * m equals (x * m) / (1 - p) for a 0/1 mask m),
        # one linear layer per mask, then one softmax for all: row by row, the same numbers
        masked = (features / (1 - self.dropout)).unsqueeze(0) * (keep >= self.dropout).to(features.device).unsqueeze(1)
        probs = torch.softmax(torch.stack([F.linear(rows, weight, bias) for rows in masked]), dim=2)
        squares = probs.pow(2).sum(dim=2)
        first, second = 0.0, 0.0
        for sample in range(self.dropout_samples):  # summed in mask order
            first = first + squares[sample]
            second = second + probs[sample]
        mean = second / self.dropout_samples
        return first / self.dropout_samples - mean.pow(2).sum(dim=1)

    def _pair(self, signatures: np.ndarray, j: int) -> np.ndarray:
        return np.asarray(signatures)[:, [j, len(self.bandwidth_factors)]]

    def fit_signatures(self, clean: np.ndarray,
                       adversarial: np.ndarray | None = None) -> KernelDensityBayesianUncertainty:
        check_is_fitted(self, "reference_")
        adversarial = require_adversarial(self, clean, adversarial)
        candidates = {j: fit_logistic(self._pair(clean, j), self._pair(adversarial, j), Cs=self.Cs, cv=self.cv)
                      for j in range(len(self.bandwidth_factors))}
        self.bandwidth_index_, self.pipeline_, self.C_ = best_by_cv(candidates)
        return self

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.decision_function(self._pair(signatures, self.bandwidth_index_))

    #: BU averages the softmax over the detector's own dropout masks, random draws fixed by
    #: ``seed``: values are equal and the gradient is the average of the per-mask gradients
    #: (expectation over transformation over those draws). KD's class choice is the argmax of the
    #: logits, kept as :meth:`signatures` makes it (piecewise constant; the gradient flows
    #: through the penultimate features).
    gradient_kind = "eot"

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """(KD at the fitted bandwidth, BU) as :meth:`signatures` computes them, differentiable,
        then the fitted logistic regression. ``eot``: BU's dropout masks are the detector's fixed
        seeded draws, so values are equal and the gradient is the mean over those draws."""
        check_is_fitted(self, "pipeline_")
        with recording([], inputs_of=final_linear(model)) as captured:
            logits = model(inputs)
        features = captured[0].flatten(1).double()
        factor = self.bandwidth_factors[self.bandwidth_index_]
        return logistic_torch(self.pipeline_, self._columns(model, logits, features, [factor]))

    def fitted_params(self) -> dict[str, Any]:
        check_is_fitted(self, "pipeline_")
        factor = self.bandwidth_factors[self.bandwidth_index_]
        return {"bandwidth": round(factor * self.median_distance_, 6), "C": self.C_}
