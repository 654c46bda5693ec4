"""Channels-last max pooling on the CPU (`channels_last_pooling`): the same numbers as the usual
layout, forward-only passes only, and the model left as it was."""

import pytest
import torch
from torch import nn

from advdetect.signatures.inference import channels_last_pooling
from advdetect.sources import embedded


class PoolsRawPixels(nn.Module):
    """Pools whole-number inputs (ties in most windows), overlapping windows with padding too."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv = nn.Conv2d(3, 4, 3)
        self.second = nn.MaxPool2d(2, ceil_mode=True)
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.conv(self.pool(x))).flatten(1))


@pytest.mark.parametrize("make_model, make_inputs", [
    (embedded.default_model, lambda: torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))),
    (lambda: torch.manual_seed(0) and PoolsRawPixels().eval(),
     lambda: torch.randint(0, 3, (6, 3, 13, 13), generator=torch.Generator().manual_seed(0)).float()),
])
def test_same_logits_and_gradients_as_the_usual_layout(make_model, make_inputs):
    model, x = make_model(), make_inputs()
    with torch.no_grad():
        logits = model(x)
    x_grad = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x_grad).logsumexp(1).sum(), x_grad)
    with channels_last_pooling(model):
        with torch.no_grad():
            assert torch.equal(model(x), logits)
        x_grad = x.clone().requires_grad_(True)
        (pooled_grad,) = torch.autograd.grad(model(x_grad).logsumexp(1).sum(), x_grad)
    assert torch.equal(pooled_grad, grad)


def test_only_forward_only_passes_pool_channels_last_and_the_next_layer_sees_the_usual_layout():
    model = PoolsRawPixels().eval()
    seen = []
    x = torch.rand(2, 3, 13, 13)
    with channels_last_pooling(model):
        # what the pool computes on, after the block's own hook; and what the next layer gets
        model.pool.register_forward_pre_hook(lambda module, args: seen.append(("pool", args[0].is_contiguous())))
        model.conv.register_forward_pre_hook(lambda module, args: seen.append(("conv", args[0].is_contiguous())))
        with torch.no_grad():
            model(x)
        model(x.requires_grad_(True))  # a gradient pass: the usual layout, where it is faster on the CPU
    model(x)  # after the block: the hooks are gone
    assert seen == [("pool", False), ("conv", True), ("pool", True), ("conv", True), ("pool", True), ("conv", True)]
