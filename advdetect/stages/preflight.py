"""Everything an audit checks before its first attack, once, at the boundary: the options, the
model and the data and how they fit, every attack of the suite tried on the model, every
detector resolved against it. A :class:`UsageError` from here means nothing was written."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advdetect.attacks import NOT_PROBED, get_attack
from advdetect.config.options import MIN_REFERENCE, defaults, validate
from advdetect.config.suite import Suite, load_suite
from advdetect.detectors import DETECTORS, Detector, build_detector
from advdetect.errors import UsageError, first_line
from advdetect.run.folder import sample_arrays
from advdetect.run.records import AttackCell, RunInfo
from advdetect.run.storage import user_cache_dir
from advdetect.signatures.inference import batched_logits, select_device
from advdetect.sources.datasets import DataOptions, DataSample, load_data, sample_tensors
from advdetect.sources.models import Dataset, LoadedModel, ModelOptions, ThreatModel, load_model, wrap_model
from advdetect.stages.attack import SeededRNG, resolved_params


@dataclass(frozen=True)
class AuditOptions:
    """What to audit and how, checked (see :func:`build_options`; the defaults and ranges are
    :data:`~advdetect.config.options.AUDIT_OPTIONS`'). ``model`` is a spec or an ``nn.Module``;
    ``data`` a spec or a pair of tensors (images in [0, 1], labels)."""

    suite: Suite
    model: str | nn.Module
    model_options: ModelOptions
    data: str | tuple[torch.Tensor, torch.Tensor]
    n: int | None
    image_size: int | None
    #: folder data: center crop side (see :class:`DataOptions`)
    crop: int | None
    seed: int
    device: str
    batch_size: int
    fit_fraction: float
    #: K >= 2: cross-fit the supervised detectors over K folds instead of one fit_fraction split
    fit_folds: int
    #: None: every registered detector, then the suite's variants
    detectors: tuple[str, ...] | None
    n_reference: int
    noisy_negatives: bool
    cache_dir: Path | None  # None: no cache

    def detector_names(self) -> tuple[str, ...]:
        if self.detectors is not None:
            return self.detectors
        return (*sorted(DETECTORS), *(v.name for v in self.suite.detectors))

    @property
    def model_label(self) -> str:
        return self.model if isinstance(self.model, str) else type(self.model).__name__

    @property
    def data_label(self) -> str:
        return self.data if isinstance(self.data, str) else "tensors"


def default_cache_dir() -> Path:
    return user_cache_dir() / "attacks"


def build_options(suite: str | Suite | None = None, **given: Any) -> AuditOptions:
    """:class:`AuditOptions` from the options' plain values, as the command line, the pytest plugin
    and the Python API give them (by the names of :data:`~advdetect.config.options.AUDIT_OPTIONS`;
    each left out takes its declared default), checked by their declarations before anything is
    loaded: a bad value raises :class:`UsageError`. ``out`` is checked too, though the run folder
    is :func:`~advdetect.stages.pipeline.run_audit`'s to make."""
    given = {**defaults(), **given, **({} if suite is None else {"suite": suite})}
    values = validate(given)
    loaded_suite = values["suite"] if isinstance(values["suite"], Suite) else load_suite(values["suite"])
    if values["attacks"]:
        loaded_suite = loaded_suite.select(values["attacks"])
    model_options = ModelOptions(weights=values["weights"], dataset=Dataset(values["dataset"]),
                                 threat_model=ThreatModel(values["threat_model"]), model_dir=values["model_dir"],
                                 mean=values["mean"], std=values["std"])
    detectors = values["detectors"]
    cache_dir = values["cache_dir"] or default_cache_dir() if values["cache"] else None
    return AuditOptions(suite=loaded_suite, model=values["model"], model_options=model_options, data=values["data"],
                        n=values["n"], image_size=values["image_size"], crop=values["crop"], seed=values["seed"],
                        device=values["device"], batch_size=values["batch_size"], fit_fraction=values["fit_fraction"],
                        fit_folds=values["fit_folds"], detectors=None if detectors is None else tuple(detectors),
                        n_reference=values["n_reference"], noisy_negatives=values["noisy_negatives"],
                        cache_dir=cache_dir)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("advdetect", "torch", "torchattacks", "scikit-learn", "numpy", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def check_model_output(model: nn.Module, inputs: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """The model's logits on ``inputs``; a UsageError unless they are one finite floating tensor
    [N, C] with C >= 2."""
    try:
        with torch.no_grad():
            logits = model(inputs.to(device))
    except Exception as exc:
        raise UsageError(f"the model cannot take inputs of shape {list(inputs.shape[1:])} ({what}): "
                         f"{first_line(exc)}") from None
    if not isinstance(logits, torch.Tensor):
        many = f" of {len(logits)} items" if isinstance(logits, (tuple, list)) else ""
        raise UsageError(f"the model must return one tensor of logits [N, classes]; it returned a "
                         f"{type(logits).__name__}{many}: wrap it so forward returns the logits alone")
    if not logits.is_floating_point() or logits.ndim != 2 or logits.shape[0] != len(inputs) or logits.shape[1] < 2:
        raise UsageError(f"the model must return floating-point logits [N, classes] with at least 2 classes; for "
                         f"{len(inputs)} inputs it returned {logits.dtype} of shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise UsageError(f"the model returns NaN or infinite logits on {bad} of {len(inputs)} {what}; "
                         f"an audit of its predictions would be meaningless")
    return logits.detach().cpu().float()


def check_compatible(model: nn.Module, sample: DataSample, device: torch.device, batch_size: int) -> torch.Tensor:
    """The model's logits on the whole sample, after checking that model and data fit each other;
    a UsageError before any attack runs otherwise."""
    if sample.x.ndim != 4:
        raise UsageError(f"data must be images [N, C, H, W]; got shape {tuple(sample.x.shape)}")
    if not any(True for _ in model.parameters()):
        raise UsageError("the model has no parameters; attacks and gradient detectors need a differentiable "
                         "torch.nn.Module with weights")
    probe = check_model_output(model, sample.x[:2], device, "a probe batch")
    again = check_model_output(model, sample.x[:2], device, "a probe batch")
    alone = check_model_output(model, sample.x[:1], device, "a probe batch")
    if not torch.allclose(probe, again, rtol=1e-4, atol=1e-5):
        raise UsageError("the model returns other logits each time it sees the same inputs (dropout or noise active "
                         "in eval mode?); attacks and detectors need a deterministic model")
    if len(probe) > 1 and not torch.allclose(probe[:1], alone, rtol=1e-3, atol=1e-4):
        raise UsageError("the model's logits for an input change with the other inputs of its batch (BatchNorm "
                         "without running statistics?); per-input results would depend on batching")
    logits = torch.cat([check_model_output(model, sample.x[i : i + batch_size], device, "the audited inputs")
                        for i in range(0, len(sample.x), batch_size)])
    for i in range(0, len(sample.reference_x), batch_size):
        check_model_output(model, sample.reference_x[i : i + batch_size], device, "the clean reference inputs")
    num_classes = int(logits.shape[1])
    for what, labels in (("the audited", sample.y), ("the reference", sample.reference_y)):
        if len(labels) and int(labels.max()) >= num_classes:
            raise UsageError(f"{what} data has labels up to {int(labels.max())} but the model outputs only "
                             f"{num_classes} classes")
    return logits


def check_device(requested: str) -> torch.device:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", requested):
        raise UsageError(f"--device {requested!r} is not one advdetect runs on; use auto, cpu, cuda or cuda:N")
    try:
        device = select_device(requested)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {requested!r} is not usable here ({first_line(exc)}); use auto or cpu") from None
    return device


@dataclass
class Prepared:
    """Everything an audit checked before its first attack: the model, the data, where it runs,
    and the model's logits on the audited inputs."""

    loaded: LoadedModel
    sample: DataSample
    device: torch.device
    logits: torch.Tensor


def prepare(options: AuditOptions) -> Prepared:
    """Load and check everything an audit needs, the suite's attacks and detectors tried on the
    model included; raises :class:`UsageError` before any work. The options' own values were
    checked by :func:`build_options`; what is checked here needs the model, the data or the device."""
    names = options.detector_names()
    detectors = [build_detector(name, options.suite.detectors) for name in names]
    check_adaptive(options, detectors)
    device = check_device(options.device)
    loaded, sample = load_inputs(options)
    loaded.module.to(device).eval()
    logits = check_compatible(loaded.module, sample, device, options.batch_size)
    if sample.info["n_reference"] < MIN_REFERENCE:
        raise UsageError(f"data {options.data_label!r} holds {sample.info['n_available']} inputs: after the "
                         f"{len(sample.y)} audited ones only {sample.info['n_reference']} remain for the clean "
                         f"reference set, and detectors need at least {MIN_REFERENCE}; lower --n")
    loaded.info["num_classes"] = int(logits.shape[1])
    for name, detector in zip(names, detectors):
        try:
            detector.check_model(loaded.module)
        except ValueError as exc:
            raise UsageError(f"detector {name}: {exc}") from None
    check_memory(loaded.module, sample.x[:1], dict(zip(names, detectors)), options.batch_size, device)
    correct = logits.argmax(dim=1) == sample.y
    if not correct.any():
        raise UsageError(f"the model classifies none of the {len(sample.y)} audited inputs correctly, and attacks and "
                         f"detectors start from correctly classified inputs, so there is nothing to audit; check that "
                         f"the labels follow the model's class order and the inputs its preprocessing (--mean/--std, "
                         f"--image-size), or raise --n")
    probe_attacks(loaded.module, options.suite.cells(), sample.x[correct][:1], sample.y[correct][:1],
                  num_classes=loaded.info["num_classes"], seed=options.seed)
    return Prepared(loaded, sample, device, logits)


def load_inputs(options: AuditOptions) -> tuple[LoadedModel, DataSample]:
    """The model, and the audited and reference inputs sampled from the data in the model's channels."""
    if isinstance(options.model, str):
        loaded = load_model(options.model, options.model_options)
    else:
        loaded = wrap_model(options.model, options.model_options)
    data_options = DataOptions(n=options.n, seed=options.seed, image_size=options.image_size, crop=options.crop,
                               channels=loaded.info["input_channels"], n_reference=options.n_reference)
    if isinstance(options.data, str):
        return loaded, load_data(options.data, data_options)
    if isinstance(options.data, tuple) and len(options.data) == 2:
        return loaded, sample_tensors(*options.data, options=data_options)
    raise UsageError(f"data must be a spec or a pair of tensors (images, labels); got {type(options.data).__name__}")


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (MemAvailable on the CPU, from /proc/meminfo); None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(model: nn.Module, one_input: torch.Tensor, detectors: dict[str, Detector], batch_size: int,
                 device: torch.device) -> None:
    """Refuse a detector whose forward passes cannot fit in memory (a variant with many noise draws
    forwards ``noise_draws`` copies of a batch at once): the bytes of every layer output for one
    input, measured on one forward pass, times the inputs it forwards at once."""
    free = available_memory(device)
    largest = max(detectors.items(), key=lambda item: item[1].inputs_at_once(batch_size), default=None)
    if free is None or largest is None:
        return
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda m, a, out: outputs.append(out.numel() * out.element_size())
                                     if isinstance(out, torch.Tensor) else None) for m in model.modules()]
    try:
        with torch.no_grad():
            model(one_input.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    name, detector = largest
    need = detector.inputs_at_once(batch_size) * (sum(outputs) + one_input.numel() * one_input.element_size())
    if need > free:
        raise UsageError(f"detector {name} forwards {detector.inputs_at_once(batch_size)} inputs at once at "
                         f"--batch-size {batch_size}, about {need / 2**30:.1f} GiB of activations, more than the "
                         f"{free / 2**30:.1f} GiB free on {device}; lower its noise_draws or --batch-size")


def check_adaptive(options: AuditOptions, detectors: list[Detector]) -> None:
    """The suite's adaptive protocol names detectors the run has, each with a differentiable score."""
    adaptive = options.suite.adaptive
    if adaptive is None:
        return
    names = options.detector_names()
    missing = [name for name in adaptive.detectors if name not in names]
    if missing:
        raise UsageError(f"the suite's [adaptive] table names detector(s) {', '.join(missing)}, which this audit does "
                         f"not run; run them (--detectors) or drop them from the table")
    for name, detector in zip(names, detectors):
        if (not adaptive.detectors or name in adaptive.detectors) and \
                type(detector).torch_scores is Detector.torch_scores:
            raise UsageError(f"detector {name} has no differentiable score, so the adaptive protocol cannot attack "
                             f"it; leave it out of [adaptive] detectors")


def probe_attacks(model: nn.Module, cells: list[AttackCell], x: torch.Tensor, y: torch.Tensor, *,
                  num_classes: int, seed: int) -> None:
    """Build every cell's attack on the model and run it on one input with its iteration budget
    cut to the least, so a bad value fails now, in one line, instead of mid-audit."""
    device = next(model.parameters()).device
    for cell in cells:
        entry = get_attack(cell.attack_name)
        params = resolved_params(cell, num_classes=num_classes, seed=seed)
        try:
            attack = entry.build(model, **(params if entry.name in NOT_PROBED else entry.probe_params(params)))
            if entry.name in NOT_PROBED:
                continue
            if callable(getattr(attack, "cut_budget", None)):  # a budget no keyword sets (autoattack)
                attack.cut_budget()
            with SeededRNG(seed, device):
                adversarial = attack(x.to(device), y.to(device))
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"attack {cell.key} cannot run with {params}: {first_line(exc)}") from None
        if not isinstance(adversarial, torch.Tensor) or adversarial.shape != x.shape:
            raise UsageError(f"attack {cell.key} returned {type(adversarial).__name__} instead of inputs shaped like "
                             f"its {tuple(x.shape)}")


def reload_model(run_dir: Path, info: RunInfo) -> nn.Module:
    """The audited model, for rerunning a stage alone; refused when it no longer computes what it did."""
    loaded = load_model(info.model["spec"], ModelOptions.from_dict(info.model["options"]))
    if loaded.info["sha256"] != info.model["sha256"]:
        raise UsageError(f"the model behind {info.model['spec']!r} changed since this run; start a new audit")
    model = loaded.module.to(select_device("auto")).eval()
    sample = sample_arrays(run_dir)
    if "logits" in sample:
        logits = batched_logits(model, torch.from_numpy(sample["x"]), info.batch_size).numpy()
        if logits.shape != sample["logits"].shape or not np.allclose(logits, sample["logits"], rtol=1e-3, atol=1e-3):
            raise UsageError(f"the model behind {info.model['spec']!r} has the audited weights but computes other "
                             f"logits than in this run (its code changed); start a new audit")
    return model


