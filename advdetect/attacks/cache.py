"""A content-addressed cache of adversarial inputs, so a repeated audit redoes no attack work.

An entry's key hashes everything its numbers depend on: the model's weights, its logits on the
attacked inputs and its gradient fingerprint (see :func:`gradient_fingerprint`: two models can share
weights and logits and still differ in what an attack reads), the attacked inputs and labels, the
attack and its constructor parameters, the seed, the batch size, the device type, the library
versions and the cache's format. Entries are written atomically; one that does not read back whole
and valid (truncated, corrupt, another key, another shape or dtype, non-finite values, values outside
[0, 1], a row outside the attack's norm budget) is deleted and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advdetect.run.robustness import threat_model
from advdetect.run.storage import load_arrays, save_arrays, user_cache_dir

log = logging.getLogger(__name__)

#: Part of every key: entries of another format (keys without the gradient fingerprint) are never read.
FORMAT = 2

#: The gradient fingerprint's parameters (see :func:`gradient_fingerprint`); changing any is a new format.
PROBE_SIZE = 8
PROBE_SEED = 0
PROBE_NOISE = 1 / 16
PROJECTIONS = 4
SIGNIFICANT_DIGITS = 4

#: How far past its budget a stored row may lie (attacks clamp in float32): ``eps * (1 + TOL) + TOL``.
BUDGET_TOLERANCE = 1e-5


def default_cache_dir() -> Path:
    return user_cache_dir() / "attacks"


def tensor_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def quantized(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> bytes:
    """``values`` (in float64) rounded to ``digits`` significant digits *of their largest finite
    magnitude*, as bytes: each value becomes the integer ``rint(v / 10**e)`` with
    ``e = floor(log10(max |v|)) - digits + 1`` (all zeros when that maximum is 0 or below 1e-300),
    followed by ``e``, the shape and a flag per value for NaN, +inf and -inf. A value far smaller than
    the largest rounds to 0, so float noise in it cannot change the bytes; integers have no -0."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    peak = float(np.abs(values[finite]).max(initial=0.0))
    exponent = math.floor(math.log10(peak)) - digits + 1 if peak > 1e-300 else 0
    scaled = np.where(finite, values, 0.0) / 10.0 ** exponent if peak > 1e-300 else np.zeros_like(values)
    mantissas = np.rint(scaled).astype(np.int64)
    flags = np.select([np.isnan(values), values == np.inf, values == -np.inf], [1, 2, 3], 0).astype(np.int8)
    return f"{values.shape}e{exponent};".encode() + mantissas.tobytes() + flags.tobytes()


def _summary(rows: torch.Tensor, seed: int) -> bytes:
    """Rows [N, D] (float64, CPU) summed up as their L2 norms and their projections onto
    ``PROJECTIONS`` fixed random directions (standard normal, seeded, divided by sqrt(D)), each block
    quantized on its own: few numbers, so float noise rarely crosses a rounding boundary."""
    directions = torch.randn(rows.shape[1], PROJECTIONS, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64) / math.sqrt(max(rows.shape[1], 1))
    norms, projections = rows.norm(dim=1), rows @ directions
    return quantized(norms.numpy()) + b"|" + quantized(projections.numpy())


def _input_gradient(model: nn.Module, probe: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | bytes:
    """d/d probe of the summed cross-entropy of ``model(probe)`` at ``labels``; for a model that
    gives none (its logits do not depend on the input through autograd, or its forward refuses an
    input that requires grad, as one that goes through NumPy does), a marker saying so."""
    try:
        with torch.enable_grad():
            inputs = probe.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(inputs), labels, reduction="sum")
            gradient = torch.autograd.grad(loss, inputs, allow_unused=True)[0] if loss.requires_grad else None
    except (RuntimeError, ValueError) as exc:
        return f"no-gradient: {type(exc).__name__}".encode()
    return b"no-gradient" if gradient is None else gradient


def gradient_fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    """What an attack reads of ``model`` around the inputs ``x`` (labels ``y``), hashed: two models with
    the same weights and the same logits on ``x`` (say, one that rounds its input to 1/255 first, whose
    input gradient is 0) differ here.

    On the probe, the first ``PROBE_SIZE`` rows of ``x`` and ``y``, with the model in eval mode (as
    torchattacks runs it), torch's RNG forked and seeded with ``PROBE_SEED`` (a randomized forward
    gives the same fingerprint each time, and the caller's RNG is untouched):

    - the input gradient ``g`` of the summed cross-entropy of ``model(probe)`` at ``y``, in float64,
      one row per input (a "no-gradient" marker for a model that gives none, see :func:`_input_gradient`);
    - the logits ``l`` of ``model(clamp(probe + u, 0, 1))``, in float64, where ``u`` is uniform in
      ``[-PROBE_NOISE, PROBE_NOISE]`` from a CPU generator seeded with ``PROBE_SEED``.

    Each of ``g`` and ``l`` is summed up per row as its L2 norm and its projections onto
    ``PROJECTIONS`` seeded standard-normal directions / sqrt(dim) (seeds ``PROBE_SEED + 1`` and
    ``+ 2``), each block rounded to ``SIGNIFICANT_DIGITS`` significant digits of its largest magnitude
    (:func:`quantized`); the fingerprint is the sha256 of those bytes. Deterministic for the same model
    on the same device and library versions (which the cache key also holds); kernels that are not
    bitwise deterministic can, rarely, move a value across a rounding boundary: a cache miss, never a
    wrong hit."""
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    probe = x[:PROBE_SIZE].detach().to(device=device, dtype=torch.float32)
    labels = y[:PROBE_SIZE].detach().to(device=device, dtype=torch.long)
    digest = hashlib.sha256(f"gradient-fingerprint/{FORMAT}/{tuple(probe.shape)}".encode())
    if len(probe) == 0:
        return digest.hexdigest()
    noise = torch.rand(probe.shape, generator=torch.Generator().manual_seed(PROBE_SEED)).to(device)
    perturbed = (probe + (2 * noise - 1) * PROBE_NOISE).clamp(0, 1)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(PROBE_SEED)
            gradient = _input_gradient(model, probe, labels)
            with torch.no_grad():
                logits = model(perturbed)
    finally:
        for module, training in modes:  # each as it was: a model may keep some layers in eval mode
            module.training = training
    digest.update(gradient if isinstance(gradient, bytes)
                  else _summary(gradient.detach().flatten(1).double().cpu(), PROBE_SEED + 1))
    digest.update(b"||" + _summary(logits.detach().flatten(1).double().cpu(), PROBE_SEED + 2))
    return digest.hexdigest()


def attack_budget(attack_name: str, params: dict[str, Any]) -> tuple[str, float] | None:
    """``(norm, eps)`` that every row of the attack's output must keep to, for a norm-bounded attack
    (threat model ``Linf`` or ``L2`` and a numeric ``eps``); None for any other."""
    eps, norm = params.get("eps"), threat_model(attack_name, params)
    if norm not in ("Linf", "L2") or isinstance(eps, bool) or not isinstance(eps, (int, float)) \
            or not math.isfinite(eps) or eps < 0:
        return None
    return norm, float(eps)


def entry_problem(x_adv: np.ndarray, like: np.ndarray, budget: tuple[str, float] | None = None) -> str | None:
    """Why ``x_adv`` cannot be the adversarial inputs for ``like`` (None when it can): another shape,
    not float (or another dtype than ``like``), non-finite values, values outside [0, 1], or a row
    whose perturbation ``x_adv - like`` exceeds the ``budget`` ``(norm, eps)``."""
    if x_adv.shape != like.shape:
        return f"shape {x_adv.shape}, expected {like.shape}"
    if not np.issubdtype(x_adv.dtype, np.floating) or x_adv.dtype != like.dtype:
        return f"dtype {x_adv.dtype}, expected {like.dtype}"
    if not np.isfinite(x_adv).all():
        return f"{int((~np.isfinite(x_adv)).sum())} non-finite values"
    if x_adv.size and (x_adv.min() < 0 or x_adv.max() > 1):
        return f"values outside [0, 1] (min {x_adv.min():.6g}, max {x_adv.max():.6g})"
    if budget is not None and len(x_adv):
        norm, eps = budget
        delta = (x_adv.astype(np.float64) - like.astype(np.float64)).reshape(len(x_adv), -1)
        sizes = np.abs(delta).max(axis=1, initial=0.0) if norm == "Linf" else np.sqrt((delta ** 2).sum(axis=1))
        over = sizes > eps * (1 + BUDGET_TOLERANCE) + BUDGET_TOLERANCE
        if over.any():
            return f"{int(over.sum())} of {len(x_adv)} rows exceed the {norm} budget eps={eps:g} " \
                   f"(largest perturbation {sizes.max():.6g})"
    return None


@dataclass(frozen=True)
class AttackCache:
    root: Path

    #: for callers that hold only the cache
    fingerprint = staticmethod(gradient_fingerprint)
    budget = staticmethod(attack_budget)

    def key(self, **parts: Any) -> str:
        parts = {**parts, "format": FORMAT, "torch": torch.__version__,
                 "torchattacks": metadata.version("torchattacks")}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def load(self, key: str, like: torch.Tensor, budget: tuple[str, float] | None = None) -> torch.Tensor | None:
        """The entry under ``key``: adversarial inputs for the clean inputs ``like``, within ``budget``
        ``(norm, eps)`` when given. None for a miss; an entry that is unreadable or invalid is a miss
        too, with a warning, and is deleted (a later store writes it back whole)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            arrays = load_arrays(path)
            x_adv, stored_key = arrays["x_adv"], str(arrays["key"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("cache entry %s is unreadable (%s); recomputing it", path, exc)
            if not isinstance(exc, OSError):
                self._discard(path)
            return None
        problem = ("it is stored under another key" if stored_key != key
                   else entry_problem(x_adv, like.detach().cpu().numpy(), budget))
        if problem is not None:
            log.warning("cache entry %s is invalid (%s); recomputing it", path, problem)
            self._discard(path)
            return None
        return torch.from_numpy(x_adv)

    @staticmethod
    def _discard(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete the invalid cache entry %s (%s)", path, exc.strerror or exc)

    def store(self, key: str, x_adv: torch.Tensor) -> None:
        """Keep an entry; a cache that cannot be written (full disk, no permission) costs a warning,
        never the audit's work."""
        try:
            save_arrays(self.path(key), key=np.array(key), x_adv=x_adv.numpy())
        except OSError as exc:
            log.warning("cannot write the attack cache entry %s (%s); the audit goes on without it",
                        self.path(key), exc.strerror or exc)
