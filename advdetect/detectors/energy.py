"""Energy score: Liu, Wang, Owens and Li, "Energy-based Out-of-distribution Detection",
NeurIPS 2020, arXiv 2010.03759.

The free energy of the logits, ``E(x) = -T logsumexp(f(x) / T)``: in-distribution inputs
have lower energy. Needs no fitting; ``T = 1`` as in the paper.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from advdetect.detectors import register_detector
from advdetect.detectors.base import Detector
from advdetect.signatures.activations import PlainForward, plain_forward


@register_detector
class EnergyScore(Detector):
    name = "energy"
    learns_from_clean = False
    plain_forward_only = True

    def __init__(self, model: nn.Module | None = None, temperature: float = 1.0) -> None:
        self.model = model
        self.temperature = temperature

    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        return self.forward_signatures(model, plain_forward(model, inputs, batch_size))

    def forward_signatures(self, model: nn.Module, forward: PlainForward) -> np.ndarray:
        logits = forward.logits.double()
        return (-self.temperature * torch.logsumexp(logits / self.temperature, dim=1)).numpy()[:, None]

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        return np.asarray(signatures)[:, 0]

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return -self.temperature * torch.logsumexp(model(inputs).double() / self.temperature, dim=1)
