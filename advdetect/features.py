"""Confounding-label gradient features.

Lee, Prabhushankar and AlRegib, "Gradient-Based Adversarial and Out-of-Distribution
Detection", ICML 2022 workshop, arXiv 2206.08255: instead of a ground-truth label, the
loss is taken against a label unlike any seen in training (all classes at once), and the
gradient it induces in each parameter tensor is the input's signature.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def confounding_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-input loss: sigmoid binary cross-entropy of the logits against the all-ones label,
    summed over classes. Shape [N]."""
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none").sum(dim=1)


@contextmanager
def _eval_with_all_grads(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Eval mode (BatchNorm uses running statistics, so inputs stay independent), every
    parameter differentiable; both restored afterwards."""
    params = [p for _, p in model.named_parameters()]
    was_training, requires = model.training, [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        model.train(was_training)
        for p, r in zip(params, requires):
            p.requires_grad_(r)


def parameter_names(model: nn.Module) -> list[str]:
    """Feature names: one per parameter tensor, in ``model.named_parameters()`` order."""
    return [name for name, _ in model.named_parameters()]


def confounding_gradient_features(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Squared L2 norm of each parameter tensor's gradient of :func:`confounding_loss`, per input.

    Returns a float64 tensor of shape [N, P] on the CPU, P = number of parameter tensors in
    ``model.named_parameters()`` order. Inputs are moved to the model's device in chunks of
    ``batch_size``. Exact: one backward pass per input.
    """
    if inputs.ndim < 2:
        raise ValueError(f"inputs must be batched, shape [N, ...]; got {tuple(inputs.shape)}")
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    with _eval_with_all_grads(model) as params:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size].to(device)
            for x in chunk:
                loss = confounding_loss(model(x.unsqueeze(0))).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                rows.append(torch.stack([
                    g.detach().double().pow(2).sum() if g is not None else torch.zeros((), dtype=torch.float64, device=device)
                    for g in grads
                ]).cpu())
    if not rows:
        return torch.zeros(0, len(list(model.parameters())), dtype=torch.float64)
    return torch.stack(rows)
