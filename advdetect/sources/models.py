"""Model specs (``--model``): every loader returns an eval-mode module taking inputs in [0, 1].

- ``default``: the embedded MNIST CNN (:mod:`advdetect.sources.embedded`).
- ``robustbench:NAME``: a RobustBench model-zoo entry, with ``--dataset``, ``--threat-model``
  and ``--model-dir`` (RobustBench's layout ``<model_dir>/<dataset>/<threat_model>/<NAME>.pt``).
- ``path/to/file.py:Callable`` or ``package.module:Callable``: a class or function returning the
  module, with ``--weights`` for a state_dict.
- ``torchvision:NAME``, ``timm:NAME``: a torchvision or timm architecture built by name with no
  weights (nothing is downloaded), then ``--weights`` (required); the number of classes is read
  from the checkpoint's classifier.
- ``path/to/model.pt``: a TorchScript archive.

``--weights`` files are state_dicts: ``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with
``torch.load(weights_only=True)``.

``--mean``/``--std`` wrap a model that expects normalized inputs.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

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
    def from_dict(cls, data: dict[str, Any]) -> ModelOptions:
        return cls(weights=data["weights"], dataset=Dataset(data["dataset"]),
                   threat_model=ThreatModel(data["threat_model"]), model_dir=data["model_dir"],
                   mean=data["mean"] and tuple(data["mean"]), std=data["std"] and tuple(data["std"]))


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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's first convolution takes (None when it has none)."""
    for param in model.parameters():
        if param.ndim == 4:
            return int(param.shape[1])
    return None


# --- loaders -------------------------------------------------------------------------------

def _default(arg: str, options: ModelOptions) -> nn.Module:
    from advdetect.sources.embedded import TRAINING, SmallCNN, default_model

    if options.weights is None:
        return default_model()
    model = SmallCNN(TRAINING["width"])  # weights of its architecture, as train-default writes them
    load_weights(model, options.weights)
    return model.eval()


def _is_html(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _robustbench(name: str, options: ModelOptions) -> nn.Module:
    from advdetect.sources._robustbench_compat import robustbench_utils

    try:
        utils = robustbench_utils()
    except ModuleNotFoundError as exc:
        raise UsageError(f"robustbench is not installed ({exc}); "
                         "install it with: pip install \"advdetect[robustbench]\"") from None
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


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or the format's header (8-byte length, then JSON) under another."""
    if path.suffix.lower() == ".safetensors":
        return True
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def read_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """The state_dict in ``weights``: a ``.safetensors`` file, or a ``torch.save`` checkpoint read
    with ``weights_only=True``; ``{"state_dict": ...}`` wrappers and ``module.`` prefixes unwrapped."""
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"weights file {weights!r} not found")
    try:
        if _is_safetensors(path):
            try:
                from safetensors.torch import load_file
            except ModuleNotFoundError:
                raise UsageError(f"reading {weights} needs safetensors: pip install safetensors") from None
            return _unwrap_checkpoint(load_file(str(path), device="cpu"))
        return _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read weights {weights}: {first_line(exc)} "
                         f"(expected a state_dict saved with torch.save or safetensors)") from None


def load_weights(model: nn.Module, weights: str) -> None:
    fit_state_dict(model, read_state_dict(weights), weights)


BATCH_COUNT = "num_batches_tracked"


def _unread_batch_counts(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own BatchNorm batch counts that ``state`` lacks although it holds the rest of
    their layer: no eval-mode forward reads them, and many checkpoints (older PyTorch, conversions
    from other frameworks) leave them out. A layer missing altogether stays missing."""
    counts = {}
    for key, value in expected.items():
        prefix = key[: -len(BATCH_COUNT)]
        if key.endswith(BATCH_COUNT) and (not prefix or prefix.endswith(".")) and key not in state and any(
                k.startswith(prefix) and "." not in k[len(prefix):] for k in state):
            counts[key] = value
    return counts


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], weights: str) -> None:
    """Load ``state`` (read from ``weights``) into ``model``; a one-line UsageError naming the
    missing, unexpected and mis-shaped (checkpoint vs model) keys unless it fits exactly, but for
    BatchNorm batch counts it lacks, which keep the model's own values."""
    expected = model.state_dict()
    state = {**state, **_unread_batch_counts(expected, state)}
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


def _classifier_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The class count of ``state`` when it differs from ``model``'s: the out dim of the checkpoint's
    tensor under the key of the model's classifier, its last weight of two or more dims (``fc``,
    ``head``, ``classifier.N`` in torchvision and timm), when the other dims agree."""
    found = None
    for key, tensor in model.state_dict().items():
        if key.endswith("weight") and tensor.ndim >= 2:
            found = key, tensor.shape
    if found is None or found[0] not in state:
        return None
    key, shape = found
    theirs = state[key].shape
    if len(theirs) != len(shape) or theirs[1:] != shape[1:] or theirs[0] == shape[0] or theirs[0] < 1:
        return None
    return int(theirs[0])


def _build_for_weights(library: str, name: str, build: Callable[..., nn.Module],
                       options: ModelOptions) -> tuple[nn.Module, dict[str, Any]]:
    """``build(**kwargs)`` with as many classes as the ``--weights`` checkpoint, loaded with it."""
    if options.weights is None:
        raise UsageError(f"--model {library}:{name} needs --weights FILE (a state_dict, .safetensors or .pt; "
                         f"weights= in the Python API): advdetect never downloads weights, and an audit of "
                         f"random weights is meaningless")
    state = read_state_dict(options.weights)
    try:
        try:
            with torch.device("meta"):  # the layer shapes, without allocating or initialising weights
                skeleton, model = build(), None
        except Exception:  # builders that compute on tensors (.item(), .tolist()) cannot run on meta
            skeleton = model = build()
        classes = _classifier_classes(skeleton, state)
        if classes is not None:
            model = build(num_classes=classes)
        elif model is None:
            model = build()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot build the {library} model {name!r}: {first_line(exc)}") from None
    fit_state_dict(model, state, options.weights)
    outputs = [t.shape[0] for k, t in model.state_dict().items() if k.endswith("weight") and t.ndim >= 2]
    return model, {"library": library, "name": name, "classifier_outputs": int(outputs[-1]) if outputs else None,
                   "classes_from_weights": classes is not None}


def _close_names(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"close names: {', '.join(close)}" if close else f"for example: {', '.join(names[:5])}"


def _import_torchvision_models() -> Any:
    from advdetect.sources._robustbench_compat import import_torchvision

    try:
        import_torchvision()
    except ModuleNotFoundError as exc:
        raise UsageError(f"torchvision is not installed ({exc}); install it with: pip install torchvision") from None
    import torchvision.models

    return torchvision.models


def _torchvision(name: str, options: ModelOptions) -> tuple[nn.Module, dict[str, Any]]:
    models = _import_torchvision_models()
    classifiers = sorted(models.list_models(module=models))
    if name not in classifiers:
        if name in models.list_models():
            raise UsageError(f"torchvision's {name!r} is not an image classifier (a detection, segmentation, video "
                             f"or optical-flow model); {_close_names(name, classifiers)}")
        raise UsageError(f"torchvision has no image classifier {name!r}; {_close_names(name, classifiers)}")
    return _build_for_weights("torchvision", name,
                              lambda **kwargs: models.get_model(name, weights=None, **kwargs), options)


def _timm(name: str, options: ModelOptions) -> tuple[nn.Module, dict[str, Any]]:
    if importlib.util.find_spec("timm") is None:
        raise UsageError('timm is not installed; install it with: pip install "advdetect[timm]"')
    from advdetect.sources._robustbench_compat import import_torchvision

    try:
        import_torchvision()  # timm imports torchvision, which needs the workaround with a CPU build of torch
        import timm
    except ModuleNotFoundError as exc:
        raise UsageError(f'timm cannot be imported ({exc}); install it with: pip install "advdetect[timm]"') from None

    if not timm.is_model(name):
        hint = "; hf-hub: names need a download, give the architecture's name" if name.startswith("hf-hub:") else ""
        raise UsageError(f"timm has no model {name!r}{hint}; {_close_names(name, sorted(timm.list_models()))}")
    model, info = _build_for_weights("timm", name,
                                     lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs), options)
    expects = getattr(model, "pretrained_cfg", None) or {}
    info.update({k: list(expects[k]) if isinstance(expects[k], tuple) else expects[k]
                 for k in ("input_size", "mean", "std") if k in expects})
    return model, info


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


#: A loader builds the module from its spec's argument; it may return what to record of the
#: architecture with it (under ``architecture`` in the model's info).
Loader = Callable[[str, ModelOptions], "nn.Module | tuple[nn.Module, dict[str, Any]]"]


def _parse(spec: str) -> tuple[Loader, str]:
    if spec == "default":
        return _default, ""
    if spec.startswith(IN_MEMORY):
        raise UsageError(f"the model {spec[len(IN_MEMORY):]} was given in memory (the Python API) and cannot be "
                         f"loaded again from the command line; run the audit again with advdetect.audit")
    if spec.startswith("robustbench:"):
        return _robustbench, spec[len("robustbench:"):]
    for prefix, loader in (("torchvision:", _torchvision), ("timm:", _timm)):
        if spec.startswith(prefix):
            if not spec[len(prefix):]:
                raise UsageError(f"model spec {spec!r} names no architecture; give {prefix}NAME, e.g. {prefix}resnet18")
            return loader, spec[len(prefix):]
    if ":" in spec:
        return _callable, spec
    if spec.endswith((".pt", ".pth", ".jit", ".ts")):
        return _torchscript, spec
    raise UsageError(f"model spec {spec!r} not understood; give default, robustbench:NAME, torchvision:NAME, "
                     f"timm:NAME, file.py:Callable, package.module:Callable or a TorchScript file.pt")


#: How a model given as an ``nn.Module`` (the Python API) is named in results; such a run's
#: stages cannot be rerun from the command line, which cannot load it.
IN_MEMORY = "in-memory:"


def load_model(spec: str, options: ModelOptions = ModelOptions()) -> LoadedModel:
    loader, arg = _parse(spec)
    _check_normalization(options)
    built = loader(arg, options)
    module, architecture = built if isinstance(built, tuple) else (built, None)
    loaded = _describe(module, spec, options)
    if architecture is not None:
        loaded.info["architecture"] = architecture
    return loaded


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
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise UsageError("the model's weights are on the meta device (shapes without values): materialize them "
                         "(model.to_empty(device=...), then load_state_dict) or give --weights")
    weights = {}
    if options.weights is not None and Path(options.weights).is_file():
        weights["weights_sha256"] = file_sha256(options.weights)
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
        **weights,
    })
