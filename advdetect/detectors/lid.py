"""Local intrinsic dimensionality: Ma, Li, Wang, Erfani, Wijewickrema, Schoenebeck, Song, Houle
and Bailey, "Characterizing Adversarial Subspaces Using Local Intrinsic Dimensionality",
ICLR 2018, arXiv 1801.02613.

At several hidden layers and the penultimate features, the maximum-likelihood LID estimate
of each input from its ``k`` nearest neighbours among clean reference activations,
``-(1/k sum_i log(r_i / r_k))^-1``; the paper draws neighbours from a clean minibatch, the
reference inputs play that part here. A logistic regression on the per-layer estimates
detects; ``k`` is tuned on the calibration split by cross-validated AUROC, as in the paper.
Needs adversarial examples to fit.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from advdetect.signatures.activations import feature_layers, final_linear, layer_activations, recording
from advdetect.detectors import register_detector
from advdetect.errors import Unavailable
from advdetect.detectors.base import (DEFAULT_CS, Detector, best_by_cv, fit_logistic, logistic_torch,
                                     require_adversarial)


def lid_mle(distances: torch.Tensor, k: int) -> torch.Tensor:
    """LID estimates from each row's distances to its neighbours (sorted or not; zeros, the
    input itself, are skipped)."""
    nearest = torch.where(distances > 0, distances, torch.inf).topk(k, dim=1, largest=False).values
    return -1.0 / torch.log(nearest / nearest[:, -1:]).mean(dim=1).clamp(max=-1e-12)


@register_detector
class LID(Detector):
    name = "lid"
    needs_adversarial = True
    uses_adversarial = True

    def __init__(self, model: nn.Module | None = None, ks: Sequence[int] = (10, 20, 30), num_layers: int = 4,
                 Cs: Sequence[float] = DEFAULT_CS, cv: int = 5) -> None:
        self.model = model
        self.ks = ks
        self.num_layers = num_layers
        self.Cs = Cs
        self.cv = cv

    def _activations(self, model: nn.Module, inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        return layer_activations(model, feature_layers(model, self.num_layers), inputs, batch_size, pooled=False,
                                 penultimate_of=final_linear(model))

    def prepare(self, model: nn.Module, reference: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64) -> LID:
        if len(reference) <= max(self.ks):
            raise Unavailable(f"lid needs more than k={max(self.ks)} reference inputs; got {len(reference)}")
        self.reference_ = [a.float() for a in self._activations(model, reference, batch_size)]
        return self


    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        check_is_fitted(self, "reference_")
        return self._estimates(self._activations(model, inputs, batch_size), self.ks).numpy()

    def _estimates(self, activations: list[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
        """[N, len(ks) * layers], k-major: each layer's LID estimate against the reference pool
        (fixed, so an input's estimate does not depend on the other inputs), on the activations' device."""
        columns = [[] for _ in ks]
        for activation, reference in zip(activations, self.reference_):
            distances = torch.cdist(activation.float(), reference.to(activation.device)).double()
            for j, k in enumerate(ks):
                columns[j].append(lid_mle(distances, k))
        return torch.stack([c for k_columns in columns for c in k_columns], dim=1)

    def _k_block(self, signatures: np.ndarray, j: int) -> np.ndarray:
        width = len(self.reference_)
        return np.asarray(signatures)[:, j * width : (j + 1) * width]

    def fit_signatures(self, clean: np.ndarray, adversarial: np.ndarray | None = None) -> LID:
        check_is_fitted(self, "reference_")
        adversarial = require_adversarial(self, clean, adversarial)
        candidates = {j: fit_logistic(self._k_block(clean, j), self._k_block(adversarial, j), Cs=self.Cs, cv=self.cv)
                      for j in range(len(self.ks))}
        self.k_index_, self.pipeline_, self.C_ = best_by_cv(candidates)
        return self

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.decision_function(self._k_block(signatures, self.k_index_))

    gradient_kind = "exact"

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The fitted k's per-layer estimates as :meth:`signatures` computes them (neighbours from
        the fixed reference pool, not from the inputs' batch), differentiable, then the logistic
        regression. ``exact``: the neighbour choice is piecewise constant, the distances carry the gradient."""
        check_is_fitted(self, "pipeline_")
        layers, last = feature_layers(model, self.num_layers), final_linear(model)
        with recording(layers, inputs_of=last) as captured:
            model(inputs)
        activations = [captured[i].flatten(1) for i in range(len(layers) + 1)]
        return logistic_torch(self.pipeline_, self._estimates(activations, [self.ks[self.k_index_]]))

    def fitted_params(self) -> dict[str, Any]:
        check_is_fitted(self, "pipeline_")
        return {"k": int(self.ks[self.k_index_]), "C": self.C_, "layers": len(self.reference_)}
