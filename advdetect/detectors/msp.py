"""Maximum softmax probability: Hendrycks and Gimpel, "A Baseline for Detecting Misclassified
and Out-of-Distribution Examples in Neural Networks", ICLR 2017, arXiv 1610.02136.

Needs nothing but the model's outputs and no fitting: the lower the top softmax
probability, the more suspect the input.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from advdetect.detectors import register_detector
from advdetect.detectors.base import Detector
from advdetect.signatures.activations import PlainForward, plain_forward


@register_detector
class MaxSoftmax(Detector):
    name = "msp"
    learns_from_clean = False
    plain_forward_only = True

    def signatures(self, model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        return self.forward_signatures(model, plain_forward(model, inputs, batch_size))

    def forward_signatures(self, model: nn.Module, forward: PlainForward) -> np.ndarray:
        return torch.softmax(forward.logits.double(), dim=1).max(dim=1).values.numpy()[:, None]

    def score_samples(self, signatures: np.ndarray) -> np.ndarray:
        return -np.asarray(signatures)[:, 0]

    def torch_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return -torch.softmax(model(inputs).double(), dim=1).max(dim=1).values
