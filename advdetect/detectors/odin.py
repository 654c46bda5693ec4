"""ODIN: Liang, Li and Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection
in Neural Networks", ICLR 2018, arXiv 1706.02690.

Temperature scaling plus input preprocessing: each input moves by ``epsilon`` (in [0, 1]
pixel units) against the sign of the gradient of the temperature-scaled cross-entropy of its
predicted class, and the score is the maximum softmax probability at temperature ``T`` of the
moved input. The signature holds that score for every (T, epsilon) of the grid; as in the
paper, the pair is tuned on the calibration split, here by AUROC against the calibration
adversarial examples. Fitted on clean inputs only, it keeps the paper's CIFAR-10 choice
(T = 1000, epsilon = 0.0014).
"""

from __future__ import annotations

import itertools
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.utils.validation import check_is_fitted
from torch import nn

from advdetect.detectors import register_detector
from advdetect.detectors.base import NON_NEGATIVE, Detector
from advdetect.signatures.inference import model_device

DEFAULT_SETTING = (1000.0, 0.0014)


def odin_scores(model: nn.Module, inputs: torch.Tensor, temperatures: Sequence[float], epsilons: Sequence[float],
                batch_size: int = 64) -> np.ndarray:
    """[N, len(temperatures) * len(epsilons)]: the maximum softmax probability at temperature T of
    the preprocessed input, T-major."""
    device = model_device(model)
    out = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device)
        moved = []  # the logits of every (T, epsilon), T-major
        x_grad = x.clone().requires_grad_(True)
        logits = model(x_grad)  # one forward pass for every temperature, and the epsilon = 0 column
        predicted = logits.argmax(dim=1)
        for i, temperature in enumerate(temperatures):
            loss = F.cross_entropy(logits / temperature, predicted, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_grad, retain_graph=i + 1 < len(temperatures))
            with torch.no_grad():
                step = grad.sign()
                moved += [model(x - epsilon * step) if epsilon else logits.detach() for epsilon in epsilons]
        with torch.no_grad():  # one softmax for every column: row by row, the same numbers as one per column
            scale = torch.tensor([t for t in temperatures for _ in epsilons], dtype=torch.float64, device=device)
            probs = torch.softmax(torch.stack(moved).double() / scale.view(-1, 1, 1), dim=2)
            out.append(probs.max(dim=2).values.T.cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(temperatures) * len(epsilons)))


@register_detector
class ODIN(Detector):
    name = "odin"
    uses_adversarial = True
    learns_from_clean = False  # without adversarial examples: the paper's setting
    bounds = {**Detector.bounds, "epsilons": NON_NEGATIVE}

    def __init__(self, model: nn.Module | None = None, temperatures: Sequence[float] = (1.0, 10.0, 100.0, 1000.0),
                 epsilons: Sequence[float] = (0.0, 0.0005, 0.0014, 0.003, 0.006)) -> None:
        self.model = model
        self.temperatures = temperatures
        self.epsilons = epsilons

    def _grid(self) -> list[tuple[float, float]]:
        return list(itertools.product(self.temperatures, self.epsilons))

    def signature_key(self) -> tuple:
        return ("odin", tuple(self.temperatures), tuple(self.epsilons))

    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        if DEFAULT_SETTING not in self._grid():
            raise ValueError(f"odin: the grid must contain the paper's setting T={DEFAULT_SETTING[0]:g}, "
                             f"epsilon={DEFAULT_SETTING[1]:g}")
        return odin_scores(model, inputs, self.temperatures, self.epsilons, batch_size)

    def fit_signatures(self, clean: np.ndarray, adversarial: np.ndarray | None = None) -> ODIN:
        grid = self._grid()
        if adversarial is None:
            self.column_ = grid.index(DEFAULT_SETTING)
        else:
            labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
            aurocs = [roc_auc_score(labels, -np.r_[clean[:, j], adversarial[:, j]]) for j in range(len(grid))]
            self.column_ = int(np.argmax(aurocs))
        self.temperature_, self.epsilon_ = grid[self.column_]
        return self

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "column_")
        return -np.asarray(signatures)[:, self.column_]

    #: The preprocessing's gradient sign is a constant on the backward pass (BPDA): the moved input
    #: ``x - epsilon * s`` has Jacobian identity in ``x``; exact when the fitted epsilon is 0.
    gradient_kind = "bpda"

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The fitted column of :func:`odin_scores`, differentiable; the sign step detached (BPDA)."""
        check_is_fitted(self, "column_")
        temperature, epsilon = self.temperature_, self.epsilon_
        if epsilon:
            with torch.enable_grad():
                x = inputs.detach().clone().requires_grad_(True)
                logits = model(x)
                loss = F.cross_entropy(logits / temperature, logits.argmax(dim=1), reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
            inputs = inputs - epsilon * grad.sign()
        return -torch.softmax(model(inputs).double() / temperature, dim=1).max(dim=1).values

    def fitted_params(self) -> dict[str, Any]:
        check_is_fitted(self, "column_")
        return {"temperature": self.temperature_, "epsilon": self.epsilon_}
