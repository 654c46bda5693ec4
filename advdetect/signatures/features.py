"""Confounding-label gradient features.

Lee, Prabhushankar and AlRegib, "Gradient-Based Adversarial and Out-of-Distribution
Detection", ICML 2022 workshop, arXiv 2206.08255: instead of a ground-truth label, the
loss is taken against a label unlike any seen in training (all classes at once), and the
gradient it induces in each parameter tensor is the input's signature.

:func:`confounding_gradient_features` gets every input's squared gradient norm per
parameter tensor from one batched forward and backward pass per chunk: hooks capture each
supported layer's input and output, one ``autograd.grad`` call gives the loss gradients
with respect to those outputs (the summed weight gradients are never computed), and closed
forms turn both into per-input norms. A parameter the hooks cannot account for (an
unsupported layer, a weight used outside its own layer) gets exact per-input gradients
through autograd instead, for that parameter alone.

:func:`confounding_gradient_torch` gives the same norms as a differentiable function of the
input, for adaptive attacks: the same capture and closed forms, with ``create_graph`` on the
loss gradients and hand-written backward passes for the closed forms of convolutions and batch
normalization, and, while recording, batch normalization and frozen convolutions swapped for
equal operations whose second derivatives autograd computes cheaply (:func:`_twice_differentiable`).
:func:`prediction_instability_torch` is the instability signature's differentiable surrogate.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
#: Largest Gram matrix batch (elements) the ghost-norm path may build for one convolution.
GHOST_MAX_ELEMENTS = 1 << 27


LABELS = ("ones", "half", "not_predicted")
LOSSES = ("sigmoid_bce", "softmax_bce", "predicted_ce")
NORMS = ("l2sq", "l1")


def confounding_label(logits: torch.Tensor, label: str = "ones") -> torch.Tensor:
    """The multi-hot label the loss is taken against. ``ones``: every class, the paper's
    confounding label. Ablations: ``half``, the first half of the classes; ``not_predicted``,
    every class but the predicted one."""
    if label == "ones":
        return torch.ones_like(logits)
    if label == "half":
        target = torch.zeros_like(logits)
        target[:, : (logits.shape[1] + 1) // 2] = 1
        return target
    if label == "not_predicted":
        return 1 - F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
    raise ValueError(f"unknown confounding label {label!r}; valid labels: {', '.join(LABELS)}")


def confounding_loss(logits: torch.Tensor, label: str = "ones", loss: str = "sigmoid_bce") -> torch.Tensor:
    """Per-input loss, shape [N]: binary cross-entropy against :func:`confounding_label`, summed
    over classes, of the sigmoid of each logit (``sigmoid_bce``, the paper's) or of the softmax
    (``softmax_bce``, an ablation); or ``predicted_ce``, the cross-entropy against the predicted
    class, which ignores ``label`` (the GraN baseline's loss, Lust and Condurache 2020)."""
    if loss == "predicted_ce":
        return F.cross_entropy(logits, logits.detach().argmax(dim=1), reduction="none")
    target = confounding_label(logits.detach(), label)
    if loss == "sigmoid_bce":
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)
    if loss == "softmax_bce":
        log_p, log_not_p = F.log_softmax(logits, dim=1), torch.log1p(-F.softmax(logits, dim=1).clamp(max=1 - 1e-7))
        return -(target * log_p + (1 - target) * log_not_p).sum(dim=1)
    raise ValueError(f"unknown confounding loss {loss!r}; valid losses: {', '.join(LOSSES)}")


def parameter_names(model: nn.Module) -> list[str]:
    """Feature names: one per parameter tensor, in ``model.named_parameters()`` order."""
    return [name for name, _ in model.named_parameters()]


@contextmanager
def eval_with_all_grads(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Eval mode (BatchNorm uses running statistics, so inputs stay independent), every
    parameter differentiable; both restored afterwards."""
    with eval_with_grads(model, lambda p: True) as params:
        yield params


@contextmanager
def eval_with_grads(model: nn.Module, differentiable: Callable[[nn.Parameter], bool]) -> Iterator[list[nn.Parameter]]:
    """Eval mode, and the parameters for which ``differentiable`` holds require gradients, the
    others not; both restored afterwards."""
    params = [p for _, p in model.named_parameters()]
    was_training, requires = model.training, [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(differentiable(p))
    try:
        yield params
    finally:
        model.train(was_training)
        for p, r in zip(params, requires):
            p.requires_grad_(r)


def per_sample_loop_features(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64, *, label: str = "ones",
                             loss: str = "sigmoid_bce", norm: str = "l2sq") -> torch.Tensor:
    """The reference: one backward pass per input. Same output as :func:`confounding_gradient_features`.
    ``norm="l1"`` (the L1 norm of each gradient tensor, an ablation) needs it: L1 has no closed form."""
    reduce = {"l2sq": _sq, "l1": lambda t: t.detach().double().abs().sum()}[norm]
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    with eval_with_all_grads(model) as params:
        for start in range(0, len(inputs), batch_size):
            for x in inputs[start : start + batch_size].to(device):
                value = confounding_loss(model(x.unsqueeze(0)), label, loss).sum()
                grads = torch.autograd.grad(value, params, allow_unused=True)
                zero = torch.zeros((), dtype=torch.float64, device=device)
                rows.append(torch.stack([reduce(g) if g is not None else zero
                                         for g in grads]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, len(list(model.parameters())), dtype=torch.float64)


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().pow(2).sum()


def _sq_rows(t: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row, in the tensor's own precision (float32 is accurate to ~1e-6 here);
    differentiable when ``t`` is (the closed forms get detached tensors unless asked for a graph)."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).double().pow(2)


def _l1_rows(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).double().abs().sum(1)


# --- capture ---------------------------------------------------------------------------------

@dataclass
class _Call:
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor
    versions: tuple[int, int]


@dataclass
class _Recorder:
    """Forward hooks on supported layers, and a record of parameters used anywhere else."""

    model: nn.Module
    clone: set[int] = field(default_factory=set)  # ids of modules whose activations must be copied
    calls: list[_Call] = field(default_factory=list)
    stack: list[nn.Module] = field(default_factory=list)
    used_elsewhere: set[int] = field(default_factory=set)
    #: The graph is to be differentiated twice: see :func:`_twice_differentiable`.
    differentiable: bool = False

    def __post_init__(self) -> None:
        self.param_ids = {id(p) for p in self.model.parameters()}

    def _pre(self, module: nn.Module, args: tuple) -> Any:
        self.stack.append(module)
        if id(module) in self.clone:
            return (args[0].clone(), *args[1:])
        return None

    def _post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        self.stack.pop()
        x = args[0]
        replaced = None
        if id(module) in self.clone:
            replaced = output.clone()  # downstream in-place ops then leave the captured output alone
        self.calls.append(_Call(module, x, output, (x._version, output._version)))
        return replaced

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.calls, self.stack = [], []
        handles = []
        for module in self.model.modules():
            if isinstance(module, SUPPORTED) and _supported_config(module):
                handles.append(module.register_forward_pre_hook(self._pre))
                handles.append(module.register_forward_hook(self._post))
        try:
            with _ParameterUse(self):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def modified_in_place(self) -> set[int]:
        return {id(c.module) for c in self.calls if (c.input._version, c.output._version) != c.versions}


class _ParameterUse(TorchFunctionMode):
    """Flags every parameter an operation uses outside the forward of the supported layer that owns it."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        recorder = self.recorder
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor) and id(value) in recorder.param_ids:
                owner = recorder.stack[-1] if recorder.stack else None
                if owner is None or all(value is not p for p in owner.parameters(recurse=False)):
                    recorder.used_elsewhere.add(id(value))
        if recorder.differentiable:
            replaced = _twice_differentiable(func, args, kwargs)
            if replaced is not None:
                return replaced
        return func(*args, **kwargs)


def _twice_differentiable(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The same operation with a cheaper second derivative, for a graph whose first backward pass
    is differentiated again (:func:`confounding_gradient_torch`); None to keep ``func``.

    - Eval-mode batch normalization as ``x * scale + shift`` (one ``addcmul``; equal up to
      rounding): autograd's double backward of ``native_batch_norm`` costs several passes over
      the activations where that of a product costs one.
    - A 2-D convolution whose weight and bias need no gradient, through
      :class:`_FrozenWeightConv2d`, whose backward is a transposed convolution: autograd's
      double backward of ``convolution_backward`` computes a weight gradient even for a frozen
      weight, a whole convolution's work wasted."""
    if func is F.batch_norm:
        bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs).arguments
        mean, var, training = bound.get("running_mean"), bound.get("running_var"), bound.get("training", False)
        if training or mean is None or var is None:
            return None
        x, weight, bias = bound["input"], bound.get("weight"), bound.get("bias")
        scale = torch.rsqrt(var + bound.get("eps", 1e-5))
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))
    if func is F.conv2d:
        x, weight, bias, stride, padding, dilation, groups = (*args, *[None] * (7 - len(args)))[:7]
        if kwargs or isinstance(padding, str) or weight.requires_grad or (bias is not None and bias.requires_grad) \
                or x.ndim != 4:
            return None
        pair = torch.nn.modules.utils._pair
        return _FrozenWeightConv2d.apply(x, weight, bias, pair(stride if stride is not None else 1),
                                         pair(padding if padding is not None else 0),
                                         pair(dilation if dilation is not None else 1), groups or 1)
    return None


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


class _FrozenWeightConv2d(torch.autograd.Function):
    """``F.conv2d`` with a weight (and bias) that needs no gradient, differentiable twice with
    respect to its input: the backward is ``conv_transpose2d``, whose own backward is one
    convolution."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                groups: int) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.config, ctx.in_size, ctx.out_size = (stride, padding, dilation, groups), x.shape[2:], out.shape[2:]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.config
        output_padding = tuple(size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in
                               zip(ctx.in_size, ctx.out_size, stride, padding, dilation, weight.shape[2:]))
        grad_x = F.conv_transpose2d(grad, weight, None, stride, padding, output_padding, groups, dilation)
        return grad_x, None, None, None, None, None, None


def _supported_config(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats and module.running_mean is not None
    if isinstance(module, nn.Embedding):
        return module.max_norm is None
    return True


# --- closed forms: per-input gradients of one layer call -------------------------------------
# Each returns {parameter: tensor}; a tensor of shape [N] is already a squared norm, one of
# shape [N, *parameter.shape] is the full per-input gradient (asked for with full=True, for
# parameters that several calls share, whose contributions must be summed before the norm).

def _linear(m: nn.Linear, x: torch.Tensor, g: torch.Tensor, full: bool) -> dict[nn.Parameter, torch.Tensor]:
    a, d = x.reshape(len(x), -1, x.shape[-1]), g.reshape(len(g), -1, g.shape[-1])  # [N, T, in], [N, T, out]
    out: dict[nn.Parameter, torch.Tensor] = {}
    steps = a.shape[1]
    if full or steps * a.shape[2] * d.shape[2] <= steps * steps * (a.shape[2] + d.shape[2]):
        grad = torch.einsum("nto,nti->noi", d, a)
        out[m.weight] = grad if full else _sq_rows(grad)
    else:  # ghost norm: |sum_t d_t a_t^T|^2 = sum_{t,s} (a_t . a_s)(d_t . d_s)
        out[m.weight] = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).flatten(1).double().sum(1)
    if m.bias is not None:
        bias = d.sum(1)
        out[m.bias] = bias if full else _sq_rows(bias)
    return out


def _conv(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, g: torch.Tensor, full: bool, differentiable: bool = False,
          norm: str = "l2sq") -> dict[nn.Parameter, torch.Tensor]:
    """Per-input weight gradients either materialized, as one convolution whose groups are the
    inputs (no unfolded copy of the input), or reduced to norms through the Gram identity
    |D U^T|^2 = sum(D^T D * U^T U) on the unfolded input: whichever costs fewer operations.
    ``differentiable`` (a graph to be differentiated again): see :func:`_conv_differentiable`."""
    if isinstance(m, nn.Conv1d):  # as a 2-D convolution of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, dilation = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
        padding: Any = m.padding if isinstance(m.padding, str) else (0, m.padding[0])
        if m.padding_mode != "zeros":
            x = F.pad(x, (*m._reversed_padding_repeated_twice[:2], 0, 0), mode=m.padding_mode)
            padding = (0, 0)
    else:
        kernel, stride, dilation, padding = m.kernel_size, m.stride, m.dilation, m.padding
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = (0, 0)
    if isinstance(padding, str):  # "same" (stride 1) or "valid"
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = (0, 0)
    n, groups, length = len(x), m.groups, g.shape[-1] * g.shape[-2]
    per_group_in, per_group_out = x.shape[1] // groups * kernel[0] * kernel[1], g.shape[1] // groups
    materialize_cost = per_group_in * per_group_out * length
    ghost_cost = length * length * (per_group_in + per_group_out)
    weight_numel = m.weight.numel()
    config = (tuple(stride), tuple(padding), tuple(dilation), groups)
    out: dict[nn.Parameter, torch.Tensor]
    if differentiable:
        out = _conv_differentiable(m, x, g, full, norm, kernel, config)
    elif full or (materialize_cost <= ghost_cost and n * weight_numel <= GHOST_MAX_ELEMENTS) \
            or n * groups * length * length > GHOST_MAX_ELEMENTS:
        if per_group_in <= per_group_out and n * groups * per_group_in * length <= GHOST_MAX_ELEMENTS:
            # few input channels (a first layer): the unfolded input is no larger than g, and one
            # batched product beats a convolution with a group per input on the CPU, whose time
            # also swells on a busy machine (128 MNIST inputs: 8 against 29 ms idle, 12 ms against
            # 2 s on a loaded 2-core machine); the same values up to float rounding (the default
            # audit's results.json did not move; tests pin 1e-10 in float64)
            u = _unfold(x, kernel, dilation, padding, stride).view(n * groups, per_group_in, length)
            grad = torch.bmm(g.reshape(n * groups, per_group_out, length), u.transpose(1, 2)).view(n, *m.weight.shape)
        else:
            grad = _per_input_conv_weight(x, g, (*m.weight.shape[:2], *kernel), config).view(n, *m.weight.shape)
        out = {m.weight: grad if full else _sq_rows(grad)}
    else:
        u = _unfold(x, kernel, dilation, padding, stride).view(n * groups, per_group_in, -1)
        d = g.reshape(n * groups, per_group_out, -1)
        gram = torch.bmm(u.transpose(1, 2), u) * torch.bmm(d.transpose(1, 2), d)
        out = {m.weight: gram.view(n, -1).double().sum(1)}
    if m.bias is not None:
        bias = g.sum((2, 3)).reshape(n, -1)
        out[m.bias] = bias if full else _l1_rows(bias) if norm == "l1" else _sq_rows(bias)
    return out


_ConvConfig = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]  # stride, padding, dilation, groups


def _conv_differentiable(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, g: torch.Tensor, full: bool, norm: str,
                         kernel: tuple[int, int], config: _ConvConfig) -> dict[nn.Parameter, torch.Tensor]:
    """The weight's entry of :func:`_conv` for a graph to be differentiated again (``x`` and ``g``
    2-D, padding already numeric). Norms come from functions with hand-written backward passes:
    :class:`_PixelGramNorms` (the Gram identity through the Gram matrix of the input's pixels)
    where it costs fewer multiply-adds than materializing the per-input gradients, for small
    outputs; else the gradients materialized, as a batched product with the unfolded input
    (:class:`_UnfoldedConvWeightNorms`) where that is no larger than the output gradient (few
    input channels: a first layer), else as grouped convolutions (:class:`_ConvWeightNorms`).
    Full per-input gradients (a weight shared between calls) are a batched product with the
    unfolded input, differentiated by autograd."""
    stride, padding, dilation, groups = config
    n, weight_shape = len(x), (*m.weight.shape[:2], *kernel)  # Conv1d's as a 2-D convolution's
    if full:
        per_group_in, per_group_out = weight_shape[1] * kernel[0] * kernel[1], weight_shape[0] // groups
        if n * groups * per_group_in * g.shape[-1] * g.shape[-2] > GHOST_MAX_ELEMENTS:
            return {m.weight: _per_input_conv_weight(x, g, weight_shape, config).view(n, *m.weight.shape)}
        u = _unfold(x, kernel, dilation, padding, stride).view(n * groups, per_group_in, -1)
        grad = torch.bmm(g.reshape(n * groups, per_group_out, -1), u.transpose(1, 2))
        return {m.weight: grad.view(n, *m.weight.shape)}
    length, pixels = g.shape[-1] * g.shape[-2], (x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1])
    materialize_cost = weight_shape[0] // groups * weight_shape[1] * kernel[0] * kernel[1] * length
    pixel_cost = weight_shape[1] * pixels ** 2 + (weight_shape[0] // groups + kernel[0] * kernel[1]) * length ** 2
    pixel_fits = n * groups * pixels ** 2 <= GHOST_MAX_ELEMENTS
    if norm == "l2sq" and pixel_fits and (pixel_cost < materialize_cost or n * m.weight.numel() > GHOST_MAX_ELEMENTS):
        return {m.weight: _PixelGramNorms.apply(x, g, kernel, config)}
    if weight_shape[1] * kernel[0] * kernel[1] <= weight_shape[0] // groups:  # the unfolded input is no larger than g
        return {m.weight: _UnfoldedConvWeightNorms.apply(x, g, kernel, config, norm)}
    return {m.weight: _ConvWeightNorms.apply(x, g, weight_shape, config, norm)}


def _per_input_conv_weight(x: torch.Tensor, g: torch.Tensor, weight_shape: tuple[int, ...],
                           config: _ConvConfig) -> torch.Tensor:
    """Every input's weight gradient [N, *weight_shape] of a 2-D convolution with input ``x`` and
    output gradient ``g``: one convolution whose groups are the inputs."""
    stride, padding, dilation, groups = config
    n = len(x)
    return torch.nn.grad.conv2d_weight(
        x.reshape(1, -1, *x.shape[2:]), (n * weight_shape[0], *weight_shape[1:]), g.reshape(1, -1, *g.shape[2:]),
        stride=stride, padding=padding, dilation=dilation, groups=n * groups).view(n, *weight_shape)


class _ConvWeightNorms(torch.autograd.Function):
    """Norms [N] (float64) of every input's weight gradient of a 2-D convolution, as a function of
    its input ``x`` and output gradient ``g``, differentiable once: with ``W_n`` the per-input
    gradient and ``V_n`` the norm's gradient with respect to it (``2 W_n``, or ``sign(W_n)`` for
    L1), the backward is ``conv(x_n, V_n)`` for ``g`` and ``conv_transpose(g_n, V_n)`` for ``x``,
    each one grouped convolution over the inputs, with no unfolded copy of the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor, weight_shape: tuple[int, ...],  # type: ignore[override]
                config: _ConvConfig, norm: str) -> torch.Tensor:
        grad = _per_input_conv_weight(x, g, weight_shape, config)
        ctx.save_for_backward(x, g, grad)
        ctx.config, ctx.norm = config, norm
        return _l1_rows(grad) if norm == "l1" else _sq_rows(grad)

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, g, grad = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.config
        n = len(x)
        scale = upstream.to(grad.dtype).view(n, *[1] * (grad.ndim - 1))
        v = grad.sign() * scale if ctx.norm == "l1" else grad * (2 * scale)
        v = v.reshape(-1, *grad.shape[2:])  # [N * out, in / groups, kh, kw]
        grad_x = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input((1, n * x.shape[1], *x.shape[2:]), v, g.reshape(1, -1, *g.shape[2:]),
                                                stride=stride, padding=padding, dilation=dilation,
                                                groups=n * groups).view_as(x)
        if ctx.needs_input_grad[1]:
            grad_g = F.conv2d(x.reshape(1, -1, *x.shape[2:]), v, None, stride, padding, dilation,
                              n * groups).view_as(g)
        return grad_x, grad_g, None, None, None


class _UnfoldedConvWeightNorms(torch.autograd.Function):
    """:class:`_ConvWeightNorms` through the unfolded input U (the columns of the convolution's
    receptive fields): per-input gradients D U^T as one batched product, and the backward as two
    more, V U for ``g`` and V^T D folded back onto ``x``. Cheaper than grouped convolutions where
    U is small, as for a first layer on few input channels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, int],  # type: ignore[override]
                config: _ConvConfig, norm: str) -> torch.Tensor:
        stride, padding, dilation, groups = config
        n = len(x)
        u = _unfold(x, kernel, dilation, padding, stride).view(n * groups, -1, g.shape[2] * g.shape[3])
        d = g.reshape(n * groups, -1, g.shape[2] * g.shape[3])
        grad = torch.bmm(d, u.transpose(1, 2)).view(n, -1)
        ctx.save_for_backward(u, d, grad)
        ctx.config, ctx.kernel, ctx.norm, ctx.shapes = config, kernel, norm, (x.shape, g.shape)
        return _l1_rows(grad) if norm == "l1" else _sq_rows(grad)

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        u, d, grad = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.config
        x_shape, g_shape = ctx.shapes
        scale = upstream.to(grad.dtype).view(-1, 1)
        v = (grad.sign() * scale if ctx.norm == "l1" else grad * (2 * scale)).view(len(d), d.shape[1], u.shape[1])
        grad_x = grad_g = None
        if ctx.needs_input_grad[1]:
            grad_g = torch.bmm(v, u).view(g_shape)
        if ctx.needs_input_grad[0]:
            columns = torch.bmm(v.transpose(1, 2), d).view(x_shape[0], -1, u.shape[2])
            grad_x = _fold(columns, x_shape, ctx.kernel, dilation, padding, stride)
        return grad_x, grad_g, None, None, None


class _PixelGramNorms(torch.autograd.Function):
    """Squared norms [N] (float64) of every input's weight gradient of a 2-D convolution through
    the Gram identity |D U^T|^2 = sum(D^T D * U^T U), with U^T U, the Gram matrix of the unfolded
    input's columns, summed from shifted windows of the Gram matrix A = X^T X of the padded
    input's pixels (one window per kernel offset) instead of unfolding the input: C P^2 + (O + k)
    L^2 multiply-adds for C input and O output channels (per group), P padded pixels, L output
    pixels and k kernel offsets. Differentiable once, the backward as cheap as the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, int],  # type: ignore[override]
                config: _ConvConfig) -> torch.Tensor:
        stride, padding, dilation, groups = config
        n, (out_h, out_w) = len(x), g.shape[2:]
        padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
        height, width = padded.shape[2:]
        pixels = padded.reshape(n * groups, -1, height * width)  # [N G, C, P]
        d = g.reshape(n * groups, -1, out_h * out_w)  # [N G, O, L]
        pixel_gram = torch.bmm(pixels.transpose(1, 2), pixels).view(-1, height, width, height, width)
        gram_d = torch.bmm(d.transpose(1, 2), d)
        gram_u = torch.zeros(n * groups, out_h, out_w, out_h, out_w, dtype=x.dtype, device=x.device)
        for window in _kernel_windows(pixel_gram, (out_h, out_w), kernel, stride, dilation):
            gram_u += window
        gram_u = gram_u.view(n * groups, out_h * out_w, out_h * out_w)
        ctx.save_for_backward(pixels, d, gram_u, gram_d)
        ctx.config, ctx.kernel, ctx.shapes = config, kernel, (x.shape, g.shape, (height, width))
        return (gram_u * gram_d).view(n, -1).double().sum(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        pixels, d, gram_u, gram_d = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.config
        x_shape, g_shape, (height, width) = ctx.shapes
        scale = (2 * upstream).to(pixels.dtype).repeat_interleave(groups).view(-1, 1, 1)  # both Grams are symmetric
        grad_x = grad_g = None
        if ctx.needs_input_grad[1]:
            grad_g = torch.bmm(d, gram_u * scale).view(g_shape)
        if ctx.needs_input_grad[0]:
            grad_pixel_gram = torch.zeros(len(pixels), height, width, height, width, dtype=pixels.dtype,
                                          device=pixels.device)
            grad_u = (gram_d * scale).view(-1, *g_shape[2:], *g_shape[2:])
            for window in _kernel_windows(grad_pixel_gram, tuple(g_shape[2:]), ctx.kernel, stride, dilation):
                window += grad_u
            grad_padded = torch.bmm(pixels, grad_pixel_gram.view(len(pixels), height * width, height * width))
            grad_x = grad_padded.view(x_shape[0], -1, height, width)[
                :, :, padding[0] : height - padding[0], padding[1] : width - padding[1]]
        return grad_x, grad_g, None, None


def _kernel_windows(gram: torch.Tensor, out_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                    dilation: tuple[int, int]) -> Iterator[torch.Tensor]:
    """Views [B, H', W', H', W'] of a pixel Gram matrix [B, H, W, H, W], one per kernel offset:
    the entries that pair the two output positions' input pixels under that offset."""
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_hw[0] - 1) + 1, stride[0])
            columns = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_hw[1] - 1) + 1, stride[1])
            yield gram[:, rows, columns, rows, columns]


def _unfold(x: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
            stride: tuple[int, int]) -> torch.Tensor:
    """``F.unfold``, as a strided view copied once when the dilation is 1: the same values, and on
    a busy CPU many times faster, backward included, than ``im2col``, whose parallel loops stall."""
    if tuple(dilation) != (1, 1):
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    windows = padded.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])  # [N, C, H', W', kh, kw]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(len(x), -1, windows.shape[2] * windows.shape[3])


def _fold(columns: torch.Tensor, shape: torch.Size, kernel: tuple[int, int], dilation: tuple[int, int],
          padding: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """The adjoint of :func:`_unfold`: columns [N, C kh kw, L] summed back onto an input of
    ``shape``, one strided addition per kernel offset when the dilation is 1."""
    if tuple(dilation) != (1, 1):
        return F.fold(columns, shape[2:], kernel, dilation=dilation, padding=padding, stride=stride)
    n, channels, height, width = shape
    out_h = (height + 2 * padding[0] - kernel[0]) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kernel[1]) // stride[1] + 1
    blocks = columns.view(n, channels, kernel[0], kernel[1], out_h, out_w)
    padded = columns.new_zeros(n, channels, height + 2 * padding[0], width + 2 * padding[1])
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            padded[:, :, i : i + stride[0] * (out_h - 1) + 1 : stride[0],
                   j : j + stride[1] * (out_w - 1) + 1 : stride[1]] += blocks[:, :, i, j]
    return padded[:, :, padding[0] : padding[0] + height, padding[1] : padding[1] + width]


def _affine(m: nn.Module, normalized: torch.Tensor, g: torch.Tensor, reduce_dims: tuple[int, ...],
            full: bool) -> dict[nn.Parameter, torch.Tensor]:
    out: dict[nn.Parameter, torch.Tensor] = {}
    if getattr(m, "weight", None) is not None:
        weight = (g * normalized).sum(reduce_dims) if reduce_dims else g * normalized
        out[m.weight] = weight.reshape(len(g), *m.weight.shape) if full else _sq_rows(weight)
    if getattr(m, "bias", None) is not None:
        bias = g.sum(reduce_dims) if reduce_dims else g
        out[m.bias] = bias.reshape(len(g), *m.bias.shape) if full else _sq_rows(bias)
    return out


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, g: torch.Tensor, full: bool,
                differentiable: bool = False, norm: str = "l2sq") -> dict:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    invstd = torch.rsqrt(m.running_var + m.eps)
    if differentiable and not full and m.weight is not None and m.bias is not None:
        weight, bias = _BatchNormNorms.apply(x, g, m.running_mean, invstd, norm)
        return {m.weight: weight, m.bias: bias}
    normalized = (x - m.running_mean.view(shape)) * invstd.view(shape)
    return _affine(m, normalized, g, tuple(range(2, x.ndim)), full)


class _BatchNormNorms(torch.autograd.Function):
    """Norms [N] (float64) of every input's gradient of an eval-mode batch normalization's weight
    and bias, ``sum(g * xhat)`` and ``sum(g)`` over the positions per channel with ``xhat = (x -
    mean) * invstd``, as a function of its input ``x`` and output gradient ``g``, differentiable
    once. The backward is one fused pass for ``g`` and one for ``x``, where autograd takes
    several over these, often the largest activations of the model."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor,  # type: ignore[override]
                invstd: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        n, channels = x.shape[:2]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        normalized = (x - mean.view(shape)).mul_(invstd.view(shape))
        flat_g, flat_x = g.reshape(n, channels, -1), normalized.view(n, channels, -1)
        weight, bias = torch.linalg.vecdot(flat_g, flat_x, dim=2), flat_g.sum(2)
        ctx.save_for_backward(normalized, g, invstd, weight, bias)
        ctx.norm = norm
        reduce = _l1_rows if norm == "l1" else _sq_rows
        return reduce(weight), reduce(bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, up_weight: torch.Tensor | None,  # type: ignore[override]
                 up_bias: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        normalized, g, invstd, weight, bias = ctx.saved_tensors

        def coefficient(upstream: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
            if upstream is None:
                return torch.zeros_like(value)
            scale = upstream.to(value.dtype).view(-1, 1)
            return value.sign() * scale if ctx.norm == "l1" else value * (2 * scale)

        c_weight, c_bias = coefficient(up_weight, weight), coefficient(up_bias, bias)
        shape = c_weight.shape + (1,) * (g.ndim - 2)
        grad_x = grad_g = None
        if ctx.needs_input_grad[1]:
            grad_g = torch.addcmul(c_bias.view(shape), normalized, c_weight.view(shape))
        if ctx.needs_input_grad[0]:
            grad_x = g * (c_weight * invstd).view(shape)
        return grad_x, grad_g, None, None, None


def _layer_norm(m: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, full: bool) -> dict:
    dims = tuple(range(x.ndim - len(m.normalized_shape), x.ndim))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    normalized = (x - mean) * torch.rsqrt(var + m.eps)
    return _affine(m, normalized, g, tuple(range(1, x.ndim - len(m.normalized_shape))), full)


def _group_norm(m: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor, full: bool) -> dict:
    grouped = x.reshape(len(x), m.num_groups, -1)
    mean, var = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
    normalized = ((grouped - mean) * torch.rsqrt(var + m.eps)).view_as(x)
    return _affine(m, normalized, g, tuple(range(2, x.ndim)), full)


def _embedding(m: nn.Embedding, x: torch.Tensor, g: torch.Tensor, full: bool) -> dict:
    index, d = x.reshape(len(x), -1), g.reshape(len(g), -1, g.shape[-1])
    if m.padding_idx is not None:
        d = d * (index != m.padding_idx).unsqueeze(-1)
    if full:
        grad = torch.zeros(len(x), *m.weight.shape, dtype=d.dtype, device=d.device)
        return {m.weight: grad.scatter_add_(1, index.unsqueeze(-1).expand_as(d), d)}
    same = (index.unsqueeze(2) == index.unsqueeze(1)).to(d.dtype)
    return {m.weight: (same * torch.bmm(d, d.transpose(1, 2))).flatten(1).double().sum(1)}


def _layer_grads(m: nn.Module, x: torch.Tensor, g: torch.Tensor, full: bool, differentiable: bool = False,
                 norm: str = "l2sq") -> dict[nn.Parameter, torch.Tensor]:
    if isinstance(m, nn.Linear):
        return _linear(m, x, g, full)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return _conv(m, x, g, full, differentiable, norm)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _batch_norm(m, x, g, full, differentiable, norm)
    if isinstance(m, nn.LayerNorm):
        return _layer_norm(m, x, g, full)
    if isinstance(m, nn.GroupNorm):
        return _group_norm(m, x, g, full)
    return _embedding(m, x, g, full)  # type: ignore[arg-type]


# --- the public function ---------------------------------------------------------------------

def _couples_inputs(model: nn.Module) -> bool:
    """BatchNorm without running statistics normalizes with batch statistics even in eval mode,
    so one input's gradient depends on its batch: only the per-input loop is right then."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not _supported_config(m) for m in model.modules())


#: Per model, the layers whose captured activations a later in-place operation changes (found
#: once, by a rerun of the first chunk), so later calls copy them from the start.
_NEEDS_COPIES: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()


def confounding_gradient_features(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64, *, label: str = "ones",
                                  loss: str = "sigmoid_bce", norm: str = "l2sq") -> torch.Tensor:
    """Squared L2 norm of each parameter tensor's gradient of :func:`confounding_loss`, per input.

    Returns a float64 tensor of shape [N, P] on the CPU, P = number of parameter tensors in
    ``model.named_parameters()`` order. Works through ``inputs`` in chunks of ``batch_size``
    on the model's device, which bounds memory; each chunk costs about one batched forward
    and backward pass. Equal to :func:`per_sample_loop_features` up to rounding.
    ``label``, ``loss`` and ``norm`` select the ablations of :func:`confounding_loss`.
    """
    if inputs.ndim < 2:
        raise ValueError(f"inputs must be batched, shape [N, ...]; got {tuple(inputs.shape)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    if norm != "l2sq" or isinstance(model, torch.jit.ScriptModule) or _couples_inputs(model):
        return per_sample_loop_features(model, inputs, batch_size, label=label, loss=loss, norm=norm)
    device = next(model.parameters()).device
    recorder = _Recorder(model, clone=_NEEDS_COPIES.setdefault(model, set()))
    rows = []
    with eval_with_all_grads(model) as params:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size].to(device)
            rows.append(_chunk_features(model, params, recorder, chunk, lambda z: confounding_loss(z, label, loss)))
    return torch.cat(rows) if rows else torch.zeros(0, len(params), dtype=torch.float64)


def _chunk_features(model: nn.Module, params: list[nn.Parameter], recorder: _Recorder, x: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor], torch.Tensor], *, differentiable: bool = False,
                    norm: str = "l2sq") -> torch.Tensor:
    """The [n, P] norms of one chunk. ``differentiable``: keep the graph through the loss
    gradients and the closed forms (``create_graph``), so the norms are a differentiable function
    of ``x``, on its device; else detached float64 on the CPU. ``norm="l1"`` only with
    ``differentiable`` (the detached path takes the per-input loop for L1)."""
    return _recorded_norms(params, recorder, _recorded_losses(model, recorder, x, loss_fn), x,
                           differentiable=differentiable, norm=norm)


def _recorded_norms(params: list[nn.Parameter], recorder: _Recorder, losses: torch.Tensor, x: torch.Tensor, *,
                    differentiable: bool, norm: str) -> torch.Tensor:
    calls = [c for c in recorder.calls if c.output.requires_grad]
    owners = _owners(calls)
    fallback = [p for p in params if id(p) in recorder.used_elsewhere or id(p) not in owners]
    grads = torch.autograd.grad(losses.sum(), [c.output for c in calls], retain_graph=bool(fallback) or differentiable,
                                create_graph=differentiable, allow_unused=True)

    def kept(t: torch.Tensor) -> torch.Tensor:
        return t if differentiable else t.detach()

    reduce_rows = _l1_rows if norm == "l1" else _sq_rows
    n = len(x)
    norms: dict[int, torch.Tensor] = {}
    shared: dict[int, torch.Tensor] = {}
    skip = {id(p) for p in fallback}
    for call, grad in zip(calls, grads):
        if grad is None:
            continue
        # L1 needs the full per-input gradients, except through the differentiable closed forms that give it
        l1_in_full = norm == "l1" and not (differentiable and _l1_closed(call.module))
        full = l1_in_full or any(owners[id(p)] > 1 and id(p) not in skip for p in call.module.parameters(recurse=False))
        for p, value in _layer_grads(call.module, kept(call.input), kept(grad), full, differentiable, norm).items():
            if id(p) in skip:
                continue
            if owners[id(p)] > 1:
                shared[id(p)] = shared[id(p)] + value if id(p) in shared else value
            else:
                norms[id(p)] = value if value.ndim == 1 else reduce_rows(value)
    for pid, value in shared.items():
        norms[pid] = reduce_rows(value)
    if fallback:
        columns: list[list[torch.Tensor]] = [[] for _ in fallback]
        for i in range(n):
            per_input = torch.autograd.grad(losses[i], fallback, retain_graph=differentiable or i < n - 1,
                                            create_graph=differentiable, allow_unused=True)
            for column, g in zip(columns, per_input):
                column.append(torch.zeros((), dtype=torch.float64, device=x.device) if g is None
                              else reduce_rows(g.unsqueeze(0))[0] if differentiable else _sq(g))
        for p, column in zip(fallback, columns):
            norms[id(p)] = torch.stack(column)
    zeros = torch.zeros(n, dtype=torch.float64, device=x.device)
    out = torch.stack([norms.get(id(p), zeros).double() for p in params], dim=1)
    return out if differentiable else out.cpu()


def _l1_closed(m: nn.Module) -> bool:
    """Whether the differentiable closed forms give ``m``'s L1 norms without materializing the
    full per-input gradients (convolutions, affine batch normalization)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.weight is not None and m.bias is not None
    return isinstance(m, (nn.Conv1d, nn.Conv2d))


def _recorded_losses(model: nn.Module, recorder: _Recorder, x: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    while True:
        with recorder.recording():
            losses = loss_fn(model(x))
        changed = recorder.modified_in_place() - recorder.clone
        if not changed:
            return losses
        recorder.clone |= changed  # rerun, copying those layers' activations


def _owners(calls: list[_Call]) -> dict[int, int]:
    """How many recorded layer calls use each parameter (by id)."""
    owners: dict[int, int] = {}
    for call in calls:
        for p in call.module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return owners


def confounding_gradient_torch(model: nn.Module, inputs: torch.Tensor, *, label: str = "ones",
                               loss: str = "sigmoid_bce", norm: str = "l2sq") -> torch.Tensor:
    """:func:`confounding_gradient_features` as a differentiable function of ``inputs``: the
    same [N, P] float64 norms (``norm`` ``l2sq`` or ``l1``), on the model's device, from one
    batch (no chunking), for an attacker who differentiates through the signature.

    The same closed forms on the same captured activations, but the loss gradients with respect
    to the layer outputs come with ``create_graph=True``, so the per-input gradient norms stay
    in the graph: about one forward and backward pass to build, two more to differentiate.
    Eval mode, BatchNorm with its running statistics. Only the parameters the closed forms cannot
    account for (and those of a layer whose output does not depend on the input) require
    gradients meanwhile, so a later ``backward()`` leaves every other ``.grad`` alone; floating
    ``inputs`` that do not require gradients are differentiated through a copy that does."""
    if inputs.ndim < 2:
        raise ValueError(f"inputs must be batched, shape [N, ...]; got {tuple(inputs.shape)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    x = inputs if inputs.requires_grad or not inputs.is_floating_point() else inputs.detach().requires_grad_(True)

    def loss_fn(z: torch.Tensor) -> torch.Tensor:
        return confounding_loss(z, label, loss)

    if isinstance(model, torch.jit.ScriptModule) or _couples_inputs(model):
        return _per_sample_torch(model, x, loss_fn, norm)
    recorder = _Recorder(model, clone=_NEEDS_COPIES.setdefault(model, set()), differentiable=True)
    needed: set[int] = set()
    while True:  # the parameters the closed forms miss need gradients of their own: rerun once with them
        with eval_with_grads(model, lambda p: id(p) in needed) as params:
            losses = _recorded_losses(model, recorder, x, loss_fn)
            owners = _owners([c for c in recorder.calls if c.output.requires_grad])
            missed = {id(p) for p in params if id(p) in recorder.used_elsewhere or id(p) not in owners}
            if missed <= needed:
                return _recorded_norms(params, recorder, losses, x, differentiable=True, norm=norm)
        needed |= missed


def _per_sample_torch(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                      norm: str) -> torch.Tensor:
    """The loop of :func:`per_sample_loop_features` with ``create_graph``: for models the closed
    forms cannot serve (TorchScript, BatchNorm on batch statistics)."""
    reduce_rows = _l1_rows if norm == "l1" else _sq_rows
    rows = []
    with eval_with_all_grads(model) as params:
        for row in x:
            grads = torch.autograd.grad(loss_fn(model(row.unsqueeze(0))).sum(), params, create_graph=True,
                                        allow_unused=True)
            rows.append(torch.stack([reduce_rows(g.unsqueeze(0))[0] if g is not None
                                     else torch.zeros((), dtype=torch.float64, device=x.device) for g in grads]))
    return torch.stack(rows) if rows else torch.zeros(0, len(params), dtype=torch.float64, device=x.device)


def prediction_instability(model: nn.Module, inputs: torch.Tensor, levels: Sequence[float], draws: int = 8, *,
                           seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """How the prediction moves under Gaussian input noise, a sensitivity signature for
    minimum-norm adversarials, which sit next to the decision boundary (see issue 12's notes and
    Hu et al. 2019, arXiv 1905.09186, on the instability of adversarial examples).

    For each noise level ``sigma`` (in input units, inputs in [0, 1]): the share of ``draws``
    noisy copies ``clip(x + sigma * z)`` whose prediction differs from the input's, smoothed to
    ``(flips + 0.5) / (draws + 1)`` so that it is never 0, and the mean KL divergence
    ``KL(p(x) || p(x + noise))``, floored at 1e-12. Both are positive so that they sit beside
    gradient norms under a logarithm. Returns float64, shape [N, 2 * len(levels)], on the CPU.

    The same ``draws`` noise images (from ``seed``) perturb every input, so an input's signature
    does not depend on its batch or on how the inputs are split among processes."""
    device = next(model.parameters()).device
    noise = instability_noise(inputs.shape[1:], levels, draws, seed, device)
    rows = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            rows.append(_instability_columns(model, x, levels, noise, soft=False).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 2 * len(levels), dtype=torch.float64)


def instability_noise(shape: Sequence[int], levels: Sequence[float], draws: int, seed: int,
                      device: torch.device) -> torch.Tensor:
    """The standard normal noise images [levels, draws, *shape] of :func:`prediction_instability`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((len(levels), draws, *shape), generator=generator).to(device)


def _instability_columns(model: nn.Module, x: torch.Tensor, levels: Sequence[float], noise: torch.Tensor, *,
                         soft: bool, temperature: float = 1.0) -> torch.Tensor:
    draws = noise.shape[1]
    log_p = F.log_softmax(model(x).double(), dim=1)
    predicted = log_p.detach().argmax(dim=1)
    columns = []
    for level, level_noise in zip(levels, noise):
        noisy = (x.unsqueeze(0) + level * level_noise.unsqueeze(1)).clamp(0, 1).flatten(0, 1)
        # one draw's copies at a time: the batch stays the size the caller chose (GPU memory), and
        # on the CPU eight small batches run faster than one large one (the same values)
        logits = torch.cat([model(copies) for copies in noisy.split(len(x))]).double().view(draws, len(x), -1)
        log_q = F.log_softmax(logits, dim=2)
        if soft:  # the probability mass that leaves the clean prediction, a smooth count of flips
            sharp = log_q if temperature == 1 else F.log_softmax(logits / temperature, dim=2)
            stay = sharp.gather(2, predicted.view(1, -1, 1).expand(draws, -1, 1)).squeeze(2).exp()
            flips = (1 - stay).sum(dim=0)
        else:
            flips = (log_q.argmax(dim=2) != predicted).sum(dim=0).double()
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=2).mean(dim=0)
        columns += [(flips + 0.5) / (draws + 1), kl.clamp_min(1e-12)]
    return torch.stack(columns, dim=1)


#: Softmax temperature of the flip-count surrogate. Low enough that the surrogate count stays
#: near the true one where the model is confident: on the embedded default model the sensitive
#: detector's differentiable scores rank clean, boundary (DeepFool-like) and FGSM inputs with
#: Spearman 0.9998 against the exact scores (0.996 at temperature 1), the boundary inputs alone
#: 0.996 (0.94), while the draws near the decision boundary, those that can flip, keep a gradient.
FLIP_TEMPERATURE = 0.1


def prediction_instability_torch(model: nn.Module, inputs: torch.Tensor, levels: Sequence[float], draws: int = 8, *,
                                 seed: int = 0, temperature: float = FLIP_TEMPERATURE) -> torch.Tensor:
    """:func:`prediction_instability` as a differentiable function of ``inputs`` (one batch, on
    the model's device, the same noise draws), for an attacker who differentiates through it.
    The KL columns are exact. The flip share counts argmax changes, a step function whose
    gradient is zero almost everywhere, so it is replaced by a surrogate: the count becomes the
    probability that leaves the clean prediction under a softmax at ``temperature`` (in logit
    units), summed over the draws; the clean prediction itself is held fixed (piecewise constant
    in the input). Temperature 0 would be the count, 1 the model's own softmax."""
    device = next(model.parameters()).device
    noise = instability_noise(inputs.shape[1:], levels, draws, seed, device)
    return _instability_columns(model, inputs, levels, noise, soft=True, temperature=temperature)
