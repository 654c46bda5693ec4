"""Batched, device-aware model evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def channels_last_pooling(model: nn.Module) -> Iterator[None]:
    """Within the block, in passes that take no gradient, each ``nn.MaxPool2d`` of a model on the
    CPU pools a channels-last copy of a contiguous 4-D input and hands on its output contiguous
    again, as it would have been. On the CPU, torch pools the usual layout several times slower
    (128 x 32 x 28 x 28: 9.8 against 2.6 ms, copies included, on two cores), and pooling takes
    about half of a forward pass of the embedded default. The values, the indices and the
    gradients are the same in either layout: the maximum is exact, and both kernels pick the same
    element among ties (pinned by a test). Passes that take a gradient keep the usual layout: with
    the backward pass, channels-last pooling made the attack stage 12-18% slower. Elsewhere (CUDA,
    TorchScript, pools returning indices) nothing changes."""
    pools = [m for m in model.modules() if type(m) is nn.MaxPool2d and not m.return_indices]
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if not pools or not on_cpu:
        yield
        return
    converted: dict[nn.Module, bool] = {}

    def before(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        converted[module] = (not torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.dim() == 4
                             and x.is_contiguous() and x.shape[1] > 1)
        return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if converted[module] else None

    def after(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        return out.contiguous() if converted.pop(module, False) else None

    handles = [h for m in pools for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
