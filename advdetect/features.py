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
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
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
                rows.append(torch.stack([reduce(g) if g is not None else torch.zeros((), dtype=torch.float64, device=device)
                                         for g in grads]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, len(list(model.parameters())), dtype=torch.float64)


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().pow(2).sum()


def _sq_rows(t: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row, in the tensor's own precision (float32 is accurate to ~1e-6 here)."""
    t = t.detach().flatten(1)
    return torch.linalg.vector_norm(t, dim=1).double().pow(2)


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
        return func(*args, **kwargs)


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


def _conv(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, g: torch.Tensor, full: bool) -> dict[nn.Parameter, torch.Tensor]:
    """Per-input weight gradients either materialized, as one convolution whose groups are the
    inputs (no unfolded copy of the input), or reduced to norms through the Gram identity
    |D U^T|^2 = sum(D^T D * U^T U) on the unfolded input: whichever costs fewer operations."""
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
    out: dict[nn.Parameter, torch.Tensor] = {}
    if full or (materialize_cost <= ghost_cost and n * weight_numel <= GHOST_MAX_ELEMENTS) \
            or n * groups * length * length > GHOST_MAX_ELEMENTS:
        grad = torch.nn.grad.conv2d_weight(
            x.reshape(1, -1, *x.shape[2:]), (n * m.weight.shape[0], m.weight.shape[1], *kernel),
            g.reshape(1, -1, *g.shape[2:]), stride=stride, padding=padding, dilation=dilation, groups=n * groups,
        ).view(n, *m.weight.shape)
        out[m.weight] = grad if full else _sq_rows(grad)
    else:
        u = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).view(n * groups, per_group_in, -1)
        d = g.reshape(n * groups, per_group_out, -1)
        gram = torch.bmm(u.transpose(1, 2), u) * torch.bmm(d.transpose(1, 2), d)
        out[m.weight] = gram.view(n, -1).double().sum(1)
    if m.bias is not None:
        bias = g.sum((2, 3)).reshape(n, -1)
        out[m.bias] = bias if full else _sq_rows(bias)
    return out


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


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, g: torch.Tensor, full: bool) -> dict:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    normalized = (x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    return _affine(m, normalized, g, tuple(range(2, x.ndim)), full)


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


def _layer_grads(m: nn.Module, x: torch.Tensor, g: torch.Tensor, full: bool) -> dict[nn.Parameter, torch.Tensor]:
    if isinstance(m, nn.Linear):
        return _linear(m, x, g, full)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return _conv(m, x, g, full)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _batch_norm(m, x, g, full)
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
_NEEDS_COPIES: "weakref.WeakKeyDictionary[nn.Module, set[int]]" = weakref.WeakKeyDictionary()


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
                    loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    while True:
        with recorder.recording():
            losses = loss_fn(model(x))
        changed = recorder.modified_in_place() - recorder.clone
        if not changed:
            break
        recorder.clone |= changed  # rerun, copying those layers' activations
    calls = [c for c in recorder.calls if c.output.requires_grad]
    owners: dict[int, int] = {}
    for call in calls:
        for p in call.module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    fallback = [p for p in params if id(p) in recorder.used_elsewhere or id(p) not in owners]
    grads = torch.autograd.grad(losses.sum(), [c.output for c in calls], retain_graph=bool(fallback), allow_unused=True)

    n = len(x)
    norms: dict[int, torch.Tensor] = {}
    shared: dict[int, torch.Tensor] = {}
    skip = {id(p) for p in fallback}
    for call, grad in zip(calls, grads):
        if grad is None:
            continue
        full = any(owners[id(p)] > 1 and id(p) not in skip for p in call.module.parameters(recurse=False))
        for p, value in _layer_grads(call.module, call.input.detach(), grad.detach(), full).items():
            if id(p) in skip:
                continue
            if owners[id(p)] > 1:
                shared[id(p)] = shared[id(p)] + value if id(p) in shared else value
            else:
                norms[id(p)] = value if value.ndim == 1 else _sq_rows(value)
    for pid, value in shared.items():
        norms[pid] = _sq_rows(value)
    for i in range(n) if fallback else ():
        per_input = torch.autograd.grad(losses[i], fallback, retain_graph=i < n - 1, allow_unused=True)
        for p, g in zip(fallback, per_input):
            norms.setdefault(id(p), torch.zeros(n, dtype=torch.float64, device=x.device))
            if g is not None:
                norms[id(p)][i] = _sq(g)
    zeros = torch.zeros(n, dtype=torch.float64, device=x.device)
    return torch.stack([norms.get(id(p), zeros).double() for p in params], dim=1).cpu()


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
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(levels), draws, *inputs.shape[1:]), generator=generator).to(device)
    rows = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            log_p = F.log_softmax(model(x).double(), dim=1)
            predicted = log_p.argmax(dim=1)
            columns = []
            for level, level_noise in zip(levels, noise):
                noisy = (x.unsqueeze(0) + level * level_noise.unsqueeze(1)).clamp(0, 1).flatten(0, 1)
                log_q = F.log_softmax(model(noisy).double(), dim=1).view(draws, len(x), -1)
                flips = (log_q.argmax(dim=2) != predicted).sum(dim=0).double()
                kl = (log_p.exp() * (log_p - log_q)).sum(dim=2).mean(dim=0)
                columns += [(flips + 0.5) / (draws + 1), kl.clamp_min(1e-12)]
            rows.append(torch.stack(columns, dim=1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 2 * len(levels), dtype=torch.float64)
