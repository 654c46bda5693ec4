"""Counting a model's passes, and what one pass costs: the floor an attack's seconds are measured against.

A *forward pass* is one input through the model; a *backward pass* is one input's gradient back
through it. Both are counted per input (a batch of 64 makes 64), by hooks on the model, so the count
is what the model was actually asked to do, whoever called it (torchattacks, pyautoattack, our own
attacks): not an estimate from an attack's parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


class PassCounter:
    """Counts the forward and backward passes of ``model`` per input while it is entered.

    A forward hook on the model adds each call's batch size to :attr:`forward`. A backward pass is
    a gradient that comes back through the model, counted by the batch size each time it arrives:
    at the model's input, when the input carries a gradient graph (an attack's gradients, and those
    taken from an inner layer, as Mahalanobis' per-layer confidences); else at its output (the
    gradients of the parameters that signatures take). So the K-1 gradients DeepFool takes of one
    forward pass count K-1 times. An input passed to the model several times is counted once per
    gradient that reaches it. A pass made under ``torch.no_grad`` counts as a forward pass only, a
    pass stopped partway (a hook that ends the forward early) not at all, and neither do the several
    gradients of one ``autograd.grad(..., is_grads_batched=True)`` (vmap hides them: it counts as
    one). Calls of the model's submodules are not counted, only calls of ``model`` itself. Counting
    runs again on a second ``with``, adding to the counts.

    >>> with PassCounter(model) as passes:
    ...     attack(x, y)
    >>> passes.forward, passes.backward
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forward = 0
        self.backward = 0
        self._handles: list[Any] = []
        self._inputs: WeakIdKeyDictionary = WeakIdKeyDictionary()  # inputs already hooked in this entry

    def __enter__(self) -> PassCounter:
        if self._handles:
            raise RuntimeError("this PassCounter is already counting")
        self._handles.append(self.model.register_forward_hook(self._on_forward))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._inputs = WeakIdKeyDictionary()

    def _on_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is None or tensor.dim() == 0:
            return
        n = tensor.shape[0]
        self.forward += n
        x = _first_tensor(args)
        if x is not None and x.requires_grad:
            if x not in self._inputs:
                self._inputs[x] = True
                self._handles.append(x.register_hook(lambda grad: self._on_backward(n)))
        elif tensor.requires_grad:
            self._handles.append(tensor.register_hook(lambda grad: self._on_backward(n)))

    def _on_backward(self, n: int) -> None:
        self.backward += n


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The model's logits: its output, or the first tensor of a tuple, list or dict it returns."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


@dataclass(frozen=True)
class PassCost:
    """Seconds per input of one forward pass (no gradient) and of one forward+backward pass (the
    gradient of the logits' sum to the input, as attacks take it), at one batch size on one device."""

    batch_size: int
    forward: float
    forward_backward: float

    @property
    def backward(self) -> float:
        """Seconds per input of a backward pass alone: a forward+backward pass less a forward pass."""
        return max(self.forward_backward - self.forward, 0.0)

    def floor(self, forward_passes: int, backward_passes: int) -> float:
        """The seconds those passes take at this cost, and nothing else: ``forward x forward cost + backward x
        backward cost``. For an attack that makes one backward pass per forward pass (PGD) it is
        ``passes x forward_backward``; a forward-only pass costs a forward pass, as it should."""
        return forward_passes * self.forward + backward_passes * self.backward

    def to_dict(self) -> dict[str, float]:
        return {"batch_size": self.batch_size, "forward": self.forward, "forward_backward": self.forward_backward,
                "backward": self.backward}


def measure_pass_cost(model: nn.Module, inputs: torch.Tensor, *, repeats: int = 5) -> PassCost:
    """Seconds per input of one forward pass and of one forward+backward pass of ``model`` on the batch
    ``inputs`` (on the model's device; eval mode): the fastest of ``repeats`` after one warm-up each, the
    floor being what the passes take when nothing else slows them."""
    device = next(model.parameters()).device
    x = inputs.to(device)
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        image = x.clone().requires_grad_(True)
        torch.autograd.grad(_first_tensor(model(image)).sum(), image)  # type: ignore[union-attr]

    def seconds(run: Any) -> float:
        run()
        times = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times) / len(x)

    return PassCost(batch_size=len(x), forward=seconds(forward), forward_backward=seconds(forward_backward))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
