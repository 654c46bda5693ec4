"""GradNorm: Huang, Geng and Li, "On the Importance of Gradients for Detecting Distributional
Shifts in the Wild", NeurIPS 2021, arXiv 2110.00218.

The L1 norm of the gradient, with respect to the final linear layer's weight, of the KL
divergence between the uniform distribution and the softmax at temperature ``T`` (1 in the
paper): in-distribution inputs give larger norms. Computed in closed form, batched: the
weight gradient is the outer product ``(softmax(f/T) - 1/C) / T`` x ``h`` with ``h`` the
penultimate features, so its L1 norm factors into ``|softmax - 1/C|_1 |h|_1 / T``.
Needs no fitting.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from advdetect.signatures.activations import PlainForward, final_linear, plain_forward, recording
from advdetect.detectors import register_detector
from advdetect.detectors.base import Detector


@register_detector
class GradNorm(Detector):
    name = "gradnorm"
    learns_from_clean = False
    plain_forward_only = True

    def __init__(self, model: nn.Module | None = None, temperature: float = 1.0) -> None:
        self.model = model
        self.temperature = temperature

    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        return self.forward_signatures(model, plain_forward(model, inputs, batch_size))

    def forward_signatures(self, model: nn.Module, forward: PlainForward) -> np.ndarray:
        return self._norms(forward.logits.double(), forward.penultimate()).numpy()[:, None]

    def _norms(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        output_grad = (probabilities - 1.0 / logits.shape[1]) / self.temperature
        return output_grad.abs().sum(dim=1) * features.abs().sum(dim=1)

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        return -np.asarray(signatures)[:, 0]

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with recording([], inputs_of=final_linear(model)) as captured:
            logits = model(inputs)
        return -self._norms(logits.double(), captured[0].flatten(1).double())
