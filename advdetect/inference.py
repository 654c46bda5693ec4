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
def batched_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of an eval-mode model, computed in batches on the model's device; returned on the CPU."""
    device = model_device(model)
    outputs = [model(inputs[i : i + batch_size].to(device)).cpu() for i in range(0, len(inputs), batch_size)]
    return torch.cat(outputs) if outputs else torch.zeros(0)
