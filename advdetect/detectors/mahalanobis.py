"""Mahalanobis: Lee, Lee, Lee and Shin, "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018, arXiv 1807.03888.

:meth:`prepare` fits class-conditional Gaussians with a covariance shared by the classes to the
spatially averaged activations of several hidden layers (see
:func:`advdetect.signatures.activations.feature_layers`) and the penultimate features, on the clean
reference inputs. The covariance is Ledoit-Wolf shrunk, since a reference set is far smaller
than the training set the paper uses. A layer's confidence score is the largest negative
Mahalanobis distance to a class mean, after input preprocessing: the input moves by the
noise magnitude along the sign of the gradient that raises that score. The signature holds
every layer's score for every noise magnitude.

With adversarial calibration examples, a logistic regression combines the layers' scores (the
paper's feature ensemble) and the noise magnitude is chosen by its cross-validated AUROC. On
clean inputs alone there is no regression: the score is the mean of the layers' standardized
distances, without noise.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.utils.validation import check_is_fitted
from torch import nn

from advdetect.signatures.activations import (counting_calls, feature_layers, final_linear, forward_until,
                                              layer_activations,
                                   pool, recording)
from advdetect.detectors import register_detector
from advdetect.detectors.base import DEFAULT_CS, NON_NEGATIVE, Detector, best_by_cv, fit_logistic, logistic_torch
from advdetect.signatures.inference import model_device


@register_detector
class Mahalanobis(Detector):
    name = "mahalanobis"
    uses_adversarial = True
    bounds = {**Detector.bounds, "noises": NON_NEGATIVE}

    def __init__(self, model: nn.Module | None = None, noises: Sequence[float] = (0.0, 0.0005, 0.001, 0.002, 0.005),
                 num_layers: int = 4, Cs: Sequence[float] = DEFAULT_CS, cv: int = 5) -> None:
        self.model = model
        self.noises = noises
        self.num_layers = num_layers
        self.Cs = Cs
        self.cv = cv

    def _layers(self, model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
        return feature_layers(model, self.num_layers), final_linear(model)

    def prepare(self, model: nn.Module, reference: torch.Tensor, labels: torch.Tensor, *,
                batch_size: int = 64) -> Mahalanobis:
        layers, last = self._layers(model)
        activations = layer_activations(model, layers, reference, batch_size, penultimate_of=last)
        labels = labels.numpy()
        classes = np.unique(labels)
        self.means_, self.precisions_ = [], []
        for features in activations:
            features = features.numpy()
            means = np.stack([features[labels == c].mean(axis=0) for c in classes])
            centered = features - means[np.searchsorted(classes, labels)]
            self.means_.append(torch.from_numpy(means))
            self.precisions_.append(torch.from_numpy(LedoitWolf(assume_centered=True).fit(centered).precision_))
        return self


    def _confidence(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Largest negative Mahalanobis distance to a class mean, per input."""
        means, precision = self.means_[layer].to(features), self.precisions_[layer].to(features)
        diff = features[:, None, :] - means[None]
        return -torch.einsum("ncd,de,nce->nc", diff, precision, diff).min(dim=1).values

    def _read(self, layer: int, captured: dict[int, torch.Tensor]) -> torch.Tensor:
        """The confidence at ``layer`` from the activations :func:`recording` captured."""
        return self._confidence(layer, pool(captured[layer]).double())

    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        check_is_fitted(self, "means_")
        layers, last = self._layers(model)
        device = model_device(model)
        count = len(self.means_)
        same_fit = {(i, j) for j in range(count) for i in range(j) if self._same_gaussian(i, j)}
        out = []
        with recording(layers, inputs_of=last) as captured:
            for start in range(0, len(inputs), batch_size):
                x = inputs[start : start + batch_size].to(device)
                columns: list[list[torch.Tensor]] = [[] for _ in self.noises]
                x_grad = x.clone().requires_grad_(True)
                with counting_calls(layers, inputs_of=last) as calls:
                    model(x_grad)  # one forward pass reads every layer; each gets its own backward pass
                twins = self._twins(captured, calls, same_fit)
                clean = {layer: self._read(layer, captured) for layer in range(count) if layer not in twins}
                last_read = max(clean)
                for layer in range(count):
                    if layer in twins:
                        for noise_columns in columns:
                            noise_columns.append(noise_columns[twins[layer]])
                        continue
                    confidence = clean[layer]
                    (grad,) = torch.autograd.grad(confidence.sum(), x_grad, retain_graph=layer < last_read)
                    read = (layers + [last])[layer]  # the noisy copies need the model only up to this layer
                    with torch.no_grad():
                        step = grad.sign()
                        for k, noise in enumerate(self.noises):
                            if noise:
                                forward_until(model, x + noise * step, read, before=read is last, calls=calls[layer])
                                confidence = self._read(layer, captured)
                            columns[k].append(confidence.detach().cpu())
                out.append(torch.stack([c for noise_columns in columns for c in noise_columns], dim=1))
        return torch.cat(out).numpy()

    def _same_gaussian(self, i: int, j: int) -> bool:
        return torch.equal(self.means_[i], self.means_[j]) and torch.equal(self.precisions_[i], self.precisions_[j])

    @staticmethod
    def _twins(captured: dict[int, torch.Tensor], calls: list[int], same_fit: set[tuple[int, int]]) -> dict[int, int]:
        """Each layer that read the very tensor an earlier layer read, under the same Gaussian, mapped
        to that layer: the penultimate features, say, when the last hidden layer read feeds the final
        linear layer. Its confidences, gradient and noisy copies are that layer's, computed once."""
        twins: dict[int, int] = {}
        for j in range(len(calls)):
            twin = next((i for i in range(j) if i not in twins and (i, j) in same_fit and captured[i] is captured[j]
                         and calls[i] == calls[j]), None)
            if twin is not None:
                twins[j] = twin
        return twins

    def _noise_block(self, signatures: np.ndarray, k: int) -> np.ndarray:
        width = len(self.means_)
        return np.asarray(signatures)[:, k * width : (k + 1) * width]

    def fit_signatures(self, clean: np.ndarray, adversarial: np.ndarray | None = None) -> Mahalanobis:
        check_is_fitted(self, "means_")
        if adversarial is None:
            self.noise_index_, self.pipeline_ = 0, None
            block = self._noise_block(clean, 0)
            self.center_, self.scale_ = block.mean(axis=0), block.std(axis=0) + 1e-12
            return self
        candidates = {k: fit_logistic(self._noise_block(clean, k), self._noise_block(adversarial, k), Cs=self.Cs,
                                      cv=self.cv)
                      for k in range(len(self.noises))}
        self.noise_index_, self.pipeline_, self.C_ = best_by_cv(candidates)
        return self

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "noise_index_")
        block = self._noise_block(signatures, self.noise_index_)
        if self.pipeline_ is None:
            return -((block - self.center_) / self.scale_).mean(axis=1)
        return self.pipeline_.decision_function(block)

    #: The preprocessing's gradient sign is a constant on the backward pass (BPDA), as in ODIN;
    #: exact when the fitted noise is 0.
    gradient_kind = "bpda"

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """:meth:`signatures`' block of the fitted noise, differentiable, then :meth:`score_samples`:
        each layer's confidence on its own preprocessed copy ``x + noise * s`` (``s`` the detached
        gradient sign; a whole forward pass records what :meth:`signatures` reads at that layer)."""
        check_is_fitted(self, "noise_index_")
        layers, last = self._layers(model)
        noise, count = self.noises[self.noise_index_], len(self.means_)
        with recording(layers, inputs_of=last) as captured:
            if noise:
                with torch.enable_grad():
                    x = inputs.detach().clone().requires_grad_(True)
                    model(x)
                    clean = [self._read(layer, captured) for layer in range(count)]
                    signs = [torch.autograd.grad(c.sum(), x, retain_graph=layer + 1 < count)[0].sign()
                             for layer, c in enumerate(clean)]
                confidences = []
                for layer, sign in enumerate(signs):
                    model(inputs + noise * sign)
                    confidences.append(self._read(layer, captured))
            else:
                model(inputs)
                confidences = [self._read(layer, captured) for layer in range(count)]
        block = torch.stack(confidences, dim=1)
        if self.pipeline_ is None:
            center, scale = torch.as_tensor(self.center_).to(block), torch.as_tensor(self.scale_).to(block)
            return -((block - center) / scale).mean(dim=1)
        return logistic_torch(self.pipeline_, block)

    def fitted_params(self) -> dict[str, Any]:
        check_is_fitted(self, "noise_index_")
        params: dict[str, Any] = {"noise": self.noises[self.noise_index_], "layers": len(self.means_)}
        if self.pipeline_ is not None:
            params["C"] = self.C_
        return params
