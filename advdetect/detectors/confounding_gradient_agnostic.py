"""Confounding-label gradients fitted without the audited attack: the signature of Lee,
Prabhushankar and AlRegib, "Gradient-Based Adversarial and Out-of-Distribution Detection", ICML
2022 workshop, arXiv 2206.08255, joined with the prediction-instability signature (see
:mod:`advdetect.detectors.confounding_gradient`), and a logistic regression fitted on adversarial
examples the detector makes itself.

In :meth:`prepare`, on the correctly classified clean reference inputs, it makes a cheap mix of
adversarial examples:

- a sign-gradient step of the cross-entropy (FGSM, Goodfellow, Shlens and Szegedy 2015, arXiv
  1412.6572) at each of ``epsilons``;
- ``iterative_steps`` projected steps of it (BIM, Kurakin, Goodfellow and Bengio 2017, arXiv
  1607.02533) at each of ``iterative_epsilons``, whose adversarial examples are *more* stable
  under noise than clean inputs, where FGSM's and the boundary steps' are less;
- DeepFool's iteration toward the runner-up class (Moosavi-Dezfooli, Fawzi and Frossard 2016,
  arXiv 1511.04599), up to ``boundary_steps`` linearized L2 steps with ``overshoot``.

Those that change the prediction are the positives, the reference inputs the negatives, and
``C`` is chosen by cross-validated AUROC. So it needs no adversarial example of any audited
attack: the audit reports it under ``seen`` and ``oneclass`` alike, as an attack-agnostic
detector, and ``unseen`` keeps its meaning (fitted on one audited attack, tested on the others).
Its FGSM and BIM steps are of the same family as an audit's Linf attacks at other strengths; CW
and DeepFool-to-any-class are the attacks it has no relative of.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch import nn

from advdetect.detectors import register_detector
from advdetect.detectors.base import DEFAULT_CS, NON_NEGATIVE
from advdetect.detectors.confounding_gradient import ConfoundingGradient
from advdetect.errors import Unavailable
from advdetect.signatures.inference import batched_logits, model_device

#: At least this many of its own adversarial examples must change the prediction to fit.
MIN_SELF_MADE = 10


def sign_gradient_step(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epsilon: float,
                       batch_size: int = 64, steps: int = 1) -> torch.Tensor:
    """``clip(x + epsilon * sign(grad_x CE(model(x), y)))``, batch by batch, on the CPU; with
    ``steps`` > 1, that many steps of ``2.5 * epsilon / steps`` each, projected back into the
    L-infinity ball of radius ``epsilon`` around ``x`` (BIM's iteration, Kurakin et al. 2017)."""
    return sign_gradient_steps(model, inputs, labels, [(epsilon, steps)], batch_size)[0]


def sign_gradient_steps(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                        runs: Sequence[tuple[float, int]], batch_size: int = 64) -> list[torch.Tensor]:
    """:func:`sign_gradient_step` for each ``(epsilon, steps)`` of ``runs``: the first step of
    every run starts from the same gradient, at the inputs, computed once per batch for all."""
    device = model_device(model)
    out: list[list[torch.Tensor]] = [[] for _ in runs]
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        first = _cross_entropy_sign(model, x, y)
        for parts, (epsilon, steps) in zip(out, runs):
            step = epsilon if steps == 1 else 2.5 * epsilon / steps
            moved, sign = x, first
            for i in range(steps):
                if i:
                    sign = _cross_entropy_sign(model, moved, y)
                moved = torch.min(torch.max(moved + step * sign, x - epsilon), x + epsilon).clamp(0, 1)
            parts.append(moved.detach().cpu())
    return [torch.cat(parts) if parts else inputs.clone() for parts in out]


def _cross_entropy_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sign of the input gradient of the summed cross-entropy."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad.sign()


def boundary_step(model: nn.Module, inputs: torch.Tensor, overshoot: float, steps: int = 3,
                  batch_size: int = 64) -> torch.Tensor:
    """DeepFool's iteration toward the runner-up class: each step adds the linearized L2 step to the
    boundary between the top two classes, ``m / |g|^2 * g`` with ``m`` the top-two logit margin and
    ``g`` the input gradient of minus that margin, to the total ``r``; the input moves to
    ``clip(x + (1 + overshoot) * r)`` and stops once its prediction changed, after at most ``steps``.
    On the CPU."""
    device = model_device(model)
    out = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device)
        with torch.no_grad():
            source = model(x).argmax(dim=1)
        total = torch.zeros_like(x)
        moved = x
        for _ in range(steps):
            moved = moved.detach().requires_grad_(True)
            logits = model(moved)
            active = logits.argmax(dim=1) == source
            if not active.any():
                break
            top2 = logits.topk(2, dim=1).values
            margin = top2[:, 0] - top2[:, 1]
            (grad,) = torch.autograd.grad(-margin.sum(), moved)
            scale = (margin.detach() + 1e-4) / grad.flatten(1).pow(2).sum(dim=1).clamp_min(1e-20)
            total = total + torch.where(active, scale, torch.zeros_like(scale)).view(-1, *[1] * (x.ndim - 1)) * grad
            moved = (x + (1 + overshoot) * total).clamp(0, 1)
        out.append(moved.detach().cpu())
    return torch.cat(out) if out else inputs.clone()


@register_detector
class ConfoundingGradientAgnostic(ConfoundingGradient):
    name = "confounding_gradient_agnostic"
    needs_adversarial = False
    uses_adversarial = False
    learns_from_clean = False  # fitted in prepare, on its own adversarial examples
    bounds = {**ConfoundingGradient.bounds, "epsilons": NON_NEGATIVE, "iterative_epsilons": NON_NEGATIVE,
              "boundary_steps": NON_NEGATIVE}

    def __init__(self, model: nn.Module | None = None, label: str = "ones", loss: str = "softmax_bce",
                 norm: str = "l2sq", layers: Sequence[str] = (), with_outputs: bool = False,
                 noise_levels: Sequence[float] = (0.02, 0.08), noise_draws: int = 8,
                 epsilons: Sequence[float] = (0.005, 0.015, 0.05, 0.15),
                 iterative_epsilons: Sequence[float] = (0.015, 0.05), iterative_steps: int = 5,
                 overshoot: float = 0.2, boundary_steps: int = 10, Cs: Sequence[float] = DEFAULT_CS,
                 cv: int = 5) -> None:
        super().__init__(model, label, loss, norm, layers, with_outputs, noise_levels, noise_draws, Cs, cv)
        self.epsilons = epsilons
        self.iterative_epsilons = iterative_epsilons
        self.iterative_steps = iterative_steps
        self.overshoot = overshoot
        self.boundary_steps = boundary_steps

    def self_made(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                  batch_size: int = 64) -> torch.Tensor:
        """Its own adversarial examples of ``inputs``: every step of the mix, those that change the prediction."""
        runs = [(eps, 1) for eps in self.epsilons if eps > 0]
        runs += [(eps, self.iterative_steps) for eps in self.iterative_epsilons if eps > 0]
        moved = sign_gradient_steps(model, inputs, labels, runs, batch_size) if runs else []
        if self.boundary_steps:
            moved.append(boundary_step(model, inputs, self.overshoot, self.boundary_steps, batch_size))
        candidates = torch.cat(moved)
        fooled = batched_logits(model, candidates, batch_size).argmax(dim=1) != labels.repeat(len(moved))
        return candidates[fooled]

    def prepare(self, model: nn.Module, reference: torch.Tensor, labels: torch.Tensor, *,
                batch_size: int = 64) -> ConfoundingGradientAgnostic:
        correct = batched_logits(model, reference, batch_size).argmax(dim=1) == labels
        clean, clean_labels = reference[correct], labels[correct]
        adversarial = self.self_made(model, clean, clean_labels, batch_size=batch_size)
        if len(clean) < MIN_SELF_MADE or len(adversarial) < MIN_SELF_MADE:
            raise Unavailable(f"{len(clean)} correctly classified reference inputs gave {len(adversarial)} "
                             f"adversarial examples of its own, {MIN_SELF_MADE} of each needed; raise --n-reference "
                             f"or the epsilons")
        super().fit_signatures(self.signatures(model, clean, batch_size=batch_size),
                               self.signatures(model, adversarial, batch_size=batch_size))
        self.n_self_made_ = len(adversarial)
        return self

    def fit_signatures(self, clean: np.ndarray, adversarial: np.ndarray | None = None) -> ConfoundingGradientAgnostic:
        """Fitted in :meth:`prepare`, on its own adversarial examples; nothing is learned from these."""
        check_is_fitted(self, "pipeline_")
        return self

    def fitted_params(self) -> dict[str, Any]:
        return {**super().fitted_params(), "n_self_made": self.n_self_made_}
