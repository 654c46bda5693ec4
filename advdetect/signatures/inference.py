"""Batched, device-aware model evaluation."""

from __future__ import annotations

import torch
from torch import nn


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def batched_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256, *,
                   num_classes: int | None = None) -> torch.Tensor:
    """Logits [N, C] of an eval-mode model, computed in batches on the model's device; returned on
    the CPU. No inputs give logits [0, C]: of ``num_classes`` classes when given, else of as many
    as the model returns for an empty batch."""
    device = model_device(model)
    if len(inputs) == 0:
        if num_classes is not None:
            return torch.zeros(0, num_classes)
        return model(inputs.to(device)).cpu()
    return torch.cat([model(inputs[i : i + batch_size].to(device)).cpu() for i in range(0, len(inputs), batch_size)])
