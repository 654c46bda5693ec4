"""Confounding-label gradients: Lee, Prabhushankar and AlRegib, "Gradient-Based Adversarial and
Out-of-Distribution Detection", ICML 2022 workshop, arXiv 2206.08255.

Signature: for each parameter tensor, the squared L2 norm of the gradient of the sigmoid
binary cross-entropy between the logits and the all-ones label (see
:func:`advdetect.confounding_gradient_features`). Detector: logistic regression on the
standardized log signatures, its inverse regularization ``C`` chosen by cross-validated
AUROC over folds that keep each (clean, adversarial) pair together. Needs adversarial
examples to fit.

Ablations (constructor arguments, settable from a suite's ``[detectors.NAME]`` table): the
``label`` (``ones``, ``half``, ``not_predicted``), the ``loss`` (``sigmoid_bce``,
``softmax_bce``), the ``norm`` (``l2sq``, ``l1``) and ``layers``, glob patterns over parameter
names that select the tensors used (all by default). Research variants: ``label`` joined by ``+``
concatenates the signatures of several labels; ``with_outputs`` adds three statistics of the
logits (top softmax probability, log-sum-exp, top-two margin) to the gradient norms;
``noise_levels`` adds a sensitivity signature, how the prediction moves under Gaussian input
noise at each level (:func:`advdetect.signatures.features.prediction_instability`, ``noise_draws`` copies
per level).

Adaptive attacks: ``torch_scores`` (here, and in the one-class and agnostic variants) is the
fitted score as a differentiable function of the input, through :meth:`torch_signatures`
(:func:`advdetect.signatures.features.confounding_gradient_torch`, the same closed forms with
``create_graph``): exact for every ablation but the sensitivity signature, whose argmax flip count
has a smooth surrogate (:func:`advdetect.signatures.features.prediction_instability_torch`). So
``gradient_kind`` is ``surrogate`` for instances with ``noise_levels``, else ``exact``.

The sensitivity variant exists because the paper's signature barely moves for minimum-norm
attacks (CW with kappa 0, DeepFool): their adversarial examples sit on the decision boundary,
where the all-ones loss is flat, but there a little noise flips the prediction. The built-in
suites run it as ``confounding_gradient_sensitive`` (softmax loss, levels 0.02 and 0.08, 8 draws);
docs/research.md ("Research round 2") gives its measured AUROC beside the paper's detector.
"""

from __future__ import annotations

import functools
import inspect
from fnmatch import fnmatch
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.validation import check_is_fitted
from torch import nn

from advdetect.detectors import register_detector
from advdetect.detectors.base import DEFAULT_CS, Detector, SignatureFunction, fit_logistic, logistic_torch, \
    require_adversarial
from advdetect.signatures.inference import batched_logits
from advdetect.signatures.features import (LABELS, LOSSES, NORMS, confounding_gradient_features,
                                           confounding_gradient_torch, eval_with_grads, parameter_names,
                                           prediction_instability, prediction_instability_torch)

# Gradient norms span many orders of magnitude; exact zeros (a parameter the loss does not
# reach) are floored instead of becoming -inf.
_FLOOR = 1e-30


def log_features(features: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(features, _FLOOR))


def log_features_torch(features: torch.Tensor) -> torch.Tensor:
    """:func:`log_features` in torch, differentiable (zero gradient below the floor)."""
    return torch.log(features.clamp_min(_FLOOR))


def output_statistics(logits: torch.Tensor) -> np.ndarray:
    """Positive statistics of the logits whose logarithms are the top softmax log-probability, the
    log-sum-exp and the log of the top-two logit margin, to sit beside gradient norms under
    :func:`log_features`."""
    return output_statistics_torch(logits.detach()).numpy()


def output_statistics_torch(logits: torch.Tensor) -> torch.Tensor:
    """:func:`output_statistics` as a differentiable function of the logits, float64 [N, 3]."""
    logits = logits.double()
    top2 = logits.topk(2, dim=1).values
    statistics = [torch.softmax(logits, 1).max(1).values, torch.logsumexp(logits, 1).clamp(max=700).exp(),
                  top2[:, 0] - top2[:, 1]]
    return torch.stack(statistics, dim=1)


class _GradientKind:
    """``gradient_kind`` of the confounding-gradient detectors: ``exact``, except ``surrogate``
    where the signature has the prediction-instability block, whose flip count, a step function,
    has a smooth stand-in. Per instance from its ``noise_levels`` (so ``set_params`` keeps it
    right); on the class, from the constructor's default."""

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        if obj is not None:
            levels = obj.noise_levels
        else:
            levels = inspect.signature(owner).parameters["noise_levels"].default
        return "surrogate" if len(levels) else "exact"


class ConfoundingSignatures(Detector):
    """The signature shared by the confounding-gradient detectors and its ablations."""

    gradient_kind = _GradientKind()  # type: ignore[assignment]

    def __init__(self, model: nn.Module | None = None, label: str = "ones", loss: str = "sigmoid_bce",
                 norm: str = "l2sq", layers: Sequence[str] = (), with_outputs: bool = False,
                 noise_levels: Sequence[float] = (), noise_draws: int = 8) -> None:
        self.model = model
        self.label = label
        self.loss = loss
        self.norm = norm
        self.layers = layers
        self.with_outputs = with_outputs
        self.noise_levels = noise_levels
        self.noise_draws = noise_draws

    def validate(self) -> None:
        for what, values, valid in (("label", self.label.split("+"), LABELS), ("loss", [self.loss], LOSSES),
                                    ("norm", [self.norm], NORMS)):
            for value in values:
                if value not in valid:
                    raise ValueError(f"{self.name}: unknown {what} {value!r}; valid: {', '.join(valid)}")

    def signature_key(self) -> tuple:
        return ("confounding_gradient", self.label, self.loss, self.norm, tuple(self.layers), self.with_outputs,
                tuple(self.noise_levels), self.noise_draws if self.noise_levels else None)

    def check_model(self, model: nn.Module) -> None:
        self._kept(model)

    def inputs_at_once(self, batch_size: int) -> int:
        return batch_size * (self.noise_draws if self.noise_levels else 1)  # every noisy copy of a batch at once

    def _kept(self, model: nn.Module) -> list[int] | slice:
        if not self.layers:
            return slice(None)
        names = parameter_names(model)
        for pattern in self.layers:
            if not any(fnmatch(name, pattern) for name in names):
                raise ValueError(f"layers pattern {pattern!r} matches no parameter of the model; its names look like "
                                 f"{', '.join(names[:3])}")
        return [i for i, name in enumerate(names) if any(fnmatch(name, p) for p in self.layers)]

    def signature_blocks(self) -> list[tuple[tuple, SignatureFunction]]:
        """One block per confounding label, then the logit statistics and the instability
        signature when asked for: the softmax variant's gradient norms are the sensitive
        variant's first columns, computed once in an audit that runs both."""
        layers = tuple(self.layers)
        blocks: list[tuple[tuple, SignatureFunction]] = [
            (("confounding_gradient_norms", label, self.loss, self.norm, layers),
             functools.partial(self._gradient_norms, label=label)) for label in self.label.split("+")]
        if self.with_outputs:
            blocks.append((("logit_statistics",), _logit_statistics))
        if self.noise_levels:
            blocks.append((("prediction_instability", tuple(self.noise_levels), self.noise_draws),
                           functools.partial(_instability, levels=tuple(self.noise_levels), draws=self.noise_draws)))
        return blocks

    def _gradient_norms(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64,
                        label: str) -> np.ndarray:
        features = confounding_gradient_features(model, inputs, batch_size=batch_size, label=label, loss=self.loss,
                                                 norm=self.norm)
        return features.numpy()[:, self._kept(model)]

    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        self.validate()
        return np.concatenate([block(model, inputs, batch_size=batch_size) for _, block in self.signature_blocks()],
                              axis=1)

    def torch_signatures(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """:meth:`signatures` as a differentiable function of ``inputs`` (one batch on the model's
        device), float64 [N, D] on that device, the blocks in the same order: the gradient norms
        and logit statistics equal, the instability block's flip share a surrogate
        (:func:`advdetect.signatures.features.prediction_instability_torch`). Eval mode; no parameter
        gradient is accumulated by a later ``backward()``."""
        self.validate()
        kept = self._kept(model)
        with eval_with_grads(model, lambda p: False):
            blocks = [confounding_gradient_torch(model, inputs, label=label, loss=self.loss, norm=self.norm)[:, kept]
                      for label in self.label.split("+")]
            if self.with_outputs:
                blocks.append(output_statistics_torch(model(inputs)))
            if self.noise_levels:
                blocks.append(prediction_instability_torch(model, inputs, tuple(self.noise_levels), self.noise_draws))
        return torch.cat(blocks, dim=1)


def _logit_statistics(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
    return output_statistics(batched_logits(model, inputs, batch_size))


def _instability(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64, levels: tuple[float, ...],
                 draws: int) -> np.ndarray:
    return prediction_instability(model, inputs, levels, draws, batch_size=batch_size).numpy()


@register_detector
class ConfoundingGradient(ConfoundingSignatures):
    name = "confounding_gradient"
    needs_adversarial = True
    uses_adversarial = True

    def __init__(self, model: nn.Module | None = None, label: str = "ones", loss: str = "sigmoid_bce",
                 norm: str = "l2sq", layers: Sequence[str] = (), with_outputs: bool = False,
                 noise_levels: Sequence[float] = (), noise_draws: int = 8, Cs: Sequence[float] = DEFAULT_CS,
                 cv: int = 5) -> None:
        super().__init__(model, label, loss, norm, layers, with_outputs, noise_levels, noise_draws)
        self.Cs = Cs
        self.cv = cv

    def fit_signatures(self, clean: np.ndarray, adversarial: np.ndarray | None = None) -> ConfoundingGradient:
        adversarial = require_adversarial(self, clean, adversarial)
        self.pipeline_: Pipeline
        self.pipeline_, self.C_, _ = fit_logistic(clean, adversarial, Cs=self.Cs, cv=self.cv,
                                                  prefix=[FunctionTransformer(log_features)])
        return self

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.decision_function(signatures)

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        check_is_fitted(self, "pipeline_")
        return logistic_torch(self.pipeline_, self.torch_signatures(model, inputs), prefix=log_features_torch)

    def fitted_params(self) -> dict[str, Any]:
        check_is_fitted(self, "pipeline_")
        return {"C": self.C_}
