"""Model specs (``--model``): every loader returns an eval-mode module taking inputs in [0, 1].

- ``default``: the embedded MNIST CNN (:mod:`advdetect.embedded`).
- ``robustbench:NAME``: a RobustBench model-zoo entry, with ``--dataset``, ``--threat-model``
  and ``--model-dir`` (RobustBench's layout ``<model_dir>/<dataset>/<threat_model>/<NAME>.pt``).
- ``path/to/file.py:Callable`` or ``package.module:Callable``: a class or function returning the
  module, with ``--weights`` for a state_dict.
- ``path/to/model.pt``: a TorchScript archive.

``--mean``/``--std`` wrap a model that expects normalized inputs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from advdetect.errors import UsageError, first_line


class Dataset(str, Enum):
    """RobustBench's datasets."""

    cifar10 = "cifar10"
    cifar100 = "cifar100"
    imagenet = "imagenet"


class ThreatModel(str, Enum):
    """RobustBench's threat models."""

    Linf = "Linf"
    L2 = "L2"
    corruptions = "corruptions"


@dataclass(frozen=True)
class ModelOptions:
    weights: str | None = None
    dataset: Dataset = Dataset.cifar10
    threat_model: ThreatModel = ThreatModel.Linf
    model_dir: str = "./models"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "dataset": self.dataset.value, "threat_model": self.threat_model.value,
                "model_dir": self.model_dir, "mean": self.mean and list(self.mean), "std": self.std and list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelOptions":
        return cls(weights=data["weights"], dataset=Dataset(data["dataset"]), threat_model=ThreatModel(data["threat_model"]),
                   model_dir=data["model_dir"], mean=data["mean"] and tuple(data["mean"]), std=data["std"] and tuple(data["std"]))


@dataclass
class LoadedModel:
    module: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


class Normalized(nn.Module):
    """Takes inputs in [0, 1] and feeds ``(x - mean) / std`` to the wrapped model."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def state_dict_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's first convolution takes (None when it has none)."""
    for param in model.parameters():
        if param.ndim == 4:
            return int(param.shape[1])
    return None


# --- loaders -------------------------------------------------------------------------------

def _default(arg: str, options: ModelOptions) -> nn.Module:
    from advdetect.embedded import default_model

    if options.weights is not None:
        raise UsageError("--weights does not apply to --model default; give a model spec such as file.py:Class")
    return default_model()


def _is_html(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _robustbench(name: str, options: ModelOptions) -> nn.Module:
    from advdetect._robustbench_compat import robustbench_utils

    try:
        utils = robustbench_utils()
    except ModuleNotFoundError as exc:
        raise UsageError(f"robustbench is not installed ({exc}); install it with: pip install \"advdetect[robustbench]\"") from None
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel as RBThreatModel

    dataset, threat = BenchmarkDataset(options.dataset.value), RBThreatModel(options.threat_model.value)
    zoo = model_dicts[dataset].get(threat, {})
    if name not in zoo:
        close = sorted(m for m in zoo if m.lower().startswith(name[:4].lower()))[:5] or sorted(zoo)[:5]
        raise UsageError(f"robustbench has no model {name!r} for {options.dataset.value}/{options.threat_model.value}; "
                         f"for example: {', '.join(close)}")
    path = Path(options.model_dir) / options.dataset.value / options.threat_model.value / f"{name}.pt"
    if path.is_file() and _is_html(path):
        raise UsageError(f"{path} is an HTML page saved by a failed download, not a checkpoint; "
                         f"delete it and place the real checkpoint at that path")
    existed = path.is_file()
    try:
        return utils.load_model(name, model_dir=options.model_dir, dataset=options.dataset.value,
                                threat_model=options.threat_model.value)
    except Exception as exc:
        if not existed:
            if path.is_file():  # whatever a failed download left is not a checkpoint
                path.unlink()
            raise UsageError(f"robustbench checkpoint {name!r} is not at {path} and downloading it failed "
                             f"({first_line(exc)}); place the checkpoint at that path") from None
        raise UsageError(f"cannot load robustbench checkpoint {path}: {first_line(exc)}; "
                         f"delete it and place a good copy there") from None


def _import_callable(spec: str) -> Callable[[], nn.Module]:
    target, _, attribute = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"model file {target!r} not found")
        module_name = f"advdetect_user_model_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise UsageError(f"cannot import model file {target}: {first_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UsageError(f"cannot import module {target!r} of model spec {spec!r}: {exc}") from None
    if not hasattr(module, attribute):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
        raise UsageError(f"{target} has no {attribute!r}; callables in it: {', '.join(found)}")
    return getattr(module, attribute)


def _unwrap_checkpoint(checkpoint: Any) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError("not a state_dict (a mapping of parameter names to tensors)")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):  # saved from DataParallel
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def load_weights(model: nn.Module, weights: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"weights file {weights!r} not found")
    try:
        state = _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise UsageError(f"cannot read weights {weights}: {first_line(exc)} "
                         f"(expected a state_dict saved with torch.save)") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise UsageError(f"weights {weights} do not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state)


def _callable(spec: str, options: ModelOptions) -> nn.Module:
    factory = _import_callable(spec)
    try:
        model = factory()
    except Exception as exc:
        raise UsageError(f"calling {spec} failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if options.weights is not None:
        load_weights(model, options.weights)
    return model


def _torchscript(spec: str, options: ModelOptions) -> nn.Module:
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"model file {spec!r} not found")
    if options.weights is not None:
        raise UsageError("--weights does not apply to a TorchScript archive, which holds its own weights")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise UsageError(f"{spec} is not a TorchScript archive ({first_line(exc)}); for a state_dict give "
                         f"--model file.py:Class --weights {spec}") from None


def _parse(spec: str) -> tuple[Callable[[str, ModelOptions], nn.Module], str]:
    if spec == "default":
        return _default, ""
    if spec.startswith(IN_MEMORY):
        raise UsageError(f"the model {spec[len(IN_MEMORY):]} was given in memory (the Python API) and cannot be "
                         f"loaded again from the command line; run the audit again with advdetect.audit")
    if spec.startswith("robustbench:"):
        return _robustbench, spec[len("robustbench:"):]
    if ":" in spec:
        return _callable, spec
    if spec.endswith((".pt", ".pth", ".jit", ".ts")):
        return _torchscript, spec
    raise UsageError(f"model spec {spec!r} not understood; give default, robustbench:NAME, file.py:Callable, "
                     f"package.module:Callable or a TorchScript file.pt")


#: How a model given as an ``nn.Module`` (the Python API) is named in results; such a run's
#: stages cannot be rerun from the command line, which cannot load it.
IN_MEMORY = "in-memory:"


def load_model(spec: str, options: ModelOptions = ModelOptions()) -> LoadedModel:
    loader, arg = _parse(spec)
    _check_normalization(options)
    return _describe(loader(arg, options), spec, options)


def wrap_model(model: nn.Module, options: ModelOptions = ModelOptions()) -> LoadedModel:
    """A model given in memory, described as :func:`load_model` describes a loaded one."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"the model must be a torch.nn.Module or a spec; got {type(model).__name__}")
    if options.weights is not None:
        load_weights(model, options.weights)
    _check_normalization(options)
    return _describe(model, f"{IN_MEMORY}{type(model).__module__}.{type(model).__qualname__}", options)


def _check_normalization(options: ModelOptions) -> None:
    if (options.mean is None) != (options.std is None):
        raise UsageError("give --mean and --std together")
    if options.std is not None and any(s <= 0 for s in options.std):
        raise UsageError(f"--std values must be positive; got {list(options.std)}")


def _describe(model: nn.Module, spec: str, options: ModelOptions) -> LoadedModel:
    if options.mean is not None and options.std is not None:
        channels = input_channels(model)
        if channels is not None and len(options.mean) not in (1, channels):
            raise UsageError(f"--mean has {len(options.mean)} values but the model takes {channels} channels")
        model = Normalized(model, options.mean, options.std)
    model.eval()
    return LoadedModel(model, {
        "spec": spec,
        "options": options.to_dict(),
        "name": getattr(model, "original_name", type(model).__name__),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_parameter_tensors": len(list(model.parameters())),
        "input_channels": input_channels(model),
        "sha256": state_dict_sha256(model),
    })
