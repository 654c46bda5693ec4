"""Intermediate activations for the baselines that read a model's hidden layers (Mahalanobis,
LID, KD+BU, GradNorm): which layers to read on an arbitrary model, and batched capture."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from advdetect.errors import Unavailable
from advdetect.signatures.inference import model_device

#: Leaf layers whose outputs are not read: parametric steps inside a block, and reshapes.
_SKIPPED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
            nn.Flatten, nn.Dropout, nn.Identity)


def _body(model: nn.Module) -> nn.Module:
    """Unwrap single-child wrappers (input normalization, DataParallel)."""
    while True:
        children = [c for c in model.children() if any(True for _ in c.parameters())]
        if len(children) != 1 or len(list(model.parameters(recurse=False))):
            return model
        model = children[0]


def _blocks(module: nn.Module, depth: int = 2) -> list[nn.Module]:
    """The model's children, Sequentials expanded ``depth`` levels deep, in order."""
    out: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and depth > 0:
            out.extend(_blocks(child, depth - 1))
        else:
            out.append(child)
    return out


def final_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or isinstance(model, torch.jit.ScriptModule):
        raise Unavailable("the model has no nn.Linear output layer that hooks can read")
    return linears[-1]


def feature_layers(model: nn.Module, count: int = 4) -> list[nn.Module]:
    """Up to ``count`` hidden layers spread evenly over the depth, ending with the last:
    the outputs of blocks, activations and pooling layers, as Lee et al. (2018) read the ends of
    a ResNet's stages. The penultimate features (the final linear layer's input) are read separately."""
    if isinstance(model, torch.jit.ScriptModule):
        raise Unavailable("TorchScript modules cannot be hooked; give the model as Python code and weights")
    last = final_linear(model)
    blocks = [m for m in _blocks(_body(model)) if m is not last]
    candidates = [m for m in blocks if not isinstance(m, _SKIPPED)]
    if not candidates:  # activations applied as functions: read the parametric layers instead
        candidates = [m for m in blocks if not isinstance(m, (nn.Flatten, nn.Dropout, nn.Identity))]
    if not candidates:
        raise Unavailable("found no hidden layers to read")
    picks = np.unique(np.round(np.linspace(len(candidates) - 1, 0, num=min(count, len(candidates)))).astype(int))
    return [candidates[i] for i in picks]


def pool(activation: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [N, C]: the mean over spatial positions (or tokens)."""
    return activation.flatten(2).mean(dim=2) if activation.ndim > 2 else activation


@contextmanager
def recording(modules: list[nn.Module], *, inputs_of: nn.Module | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, each forward stores the output of ``modules[i]`` under key ``i``, and the
    input of ``inputs_of`` under key ``len(modules)``."""
    captured: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out)) for i,
               m in enumerate(modules)]
    if inputs_of is not None:
        handles.append(inputs_of.register_forward_pre_hook(lambda m, a: captured.__setitem__(len(modules), a[0])))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the layer it waits for has run."""


def forward_until(model: nn.Module, x: torch.Tensor, module: nn.Module, *, before: bool = False,
                  calls: int = 1) -> None:
    """Run ``model`` on ``x`` only as far as the ``calls``-th run of ``module`` (its output, or
    with ``before`` its input): hooks recording that layer see what a whole forward pass would
    give them (the last of its runs, when ``calls`` is how often a whole pass runs it), for less."""
    seen = [0]

    def reached(*args: object) -> None:
        seen[0] += 1
        if seen[0] == calls:
            raise _Reached

    handle = module.register_forward_pre_hook(reached) if before else module.register_forward_hook(reached)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()


@contextmanager
def counting_calls(modules: list[nn.Module], *, inputs_of: nn.Module) -> Iterator[list[int]]:
    """Within the block, how often each of ``modules`` ran, then how often ``inputs_of`` did."""
    counts = [0] * (len(modules) + 1)

    def counter(i: int):  # type: ignore[no-untyped-def]
        return lambda *args: counts.__setitem__(i, counts[i] + 1)

    handles = [m.register_forward_hook(counter(i)) for i, m in enumerate(modules)]
    handles.append(inputs_of.register_forward_pre_hook(counter(len(modules))))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@dataclass
class PlainForward:
    """What one plain forward pass (no gradients) over a set of inputs gives, on the CPU: the logits
    [N, C] as the model returns them, and the penultimate features [N, D] (the final linear layer's
    input, flattened, float64) where the model has a final linear layer that hooks can read."""

    logits: torch.Tensor
    features: torch.Tensor | None
    #: why there are no penultimate features
    missing: str = ""

    def penultimate(self) -> torch.Tensor:
        """The penultimate features; :class:`~advdetect.errors.Unavailable` if the model has none."""
        if self.features is None:
            raise Unavailable(self.missing)
        return self.features


def plain_forward(model: nn.Module, inputs: torch.Tensor, batch_size: int = 128) -> PlainForward:
    """The logits and penultimate features of ``inputs``, in batches of ``batch_size``; no
    gradients. No inputs give [0, C] and [0, D], from the model run on the empty batch."""
    try:
        last: nn.Module | None = final_linear(model)
        missing = ""
    except Unavailable as exc:  # the logits alone, of any model (TorchScript too)
        last, missing = None, str(exc)
    device = model_device(model)
    logits, features = [], []
    with torch.no_grad(), recording([], inputs_of=last) as captured:
        for start in range(0, max(len(inputs), 1), batch_size):
            logits.append(model(inputs[start : start + batch_size].to(device)).cpu())
            if last is not None:
                features.append(captured[0].flatten(1).double().cpu())
    return PlainForward(torch.cat(logits), torch.cat(features) if last is not None else None, missing)


def penultimate(model: nn.Module, inputs: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features) on the CPU, float64; no gradients."""
    forward = plain_forward(model, inputs, batch_size)
    return forward.logits.double(), forward.penultimate()


def layer_activations(model: nn.Module, layers: list[nn.Module], inputs: torch.Tensor, batch_size: int = 128, *,
                      pooled: bool = True, penultimate_of: nn.Module | None = None) -> list[torch.Tensor]:
    """Each layer's output per input on the CPU (float64; spatially pooled or flattened), then the
    input of ``penultimate_of`` if given."""
    device = model_device(model)
    count = len(layers) + (penultimate_of is not None)
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(count)]
    with torch.no_grad(), recording(layers, inputs_of=penultimate_of) as captured:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size].to(device))
            for i, store in enumerate(per_layer):
                store.append((pool(captured[i]) if pooled else captured[i].flatten(1)).double().cpu())
    return [torch.cat(store) for store in per_layer]
