"""Loading and checking what an audit needs before any work, and the attack stage, which writes
each cell's adversarial inputs into the run folder (see :mod:`advdetect.rundir`)."""

from __future__ import annotations

import hashlib
import logging
import platform
import re
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advdetect.attacks import NOT_PROBED, get_attack
from advdetect.cache import AttackCache, tensor_sha256
from advdetect.datasets import DataOptions, DataSample, load_data
from advdetect.detectors import DETECTORS, build_detector
from advdetect.errors import UsageError
from advdetect.history import now
from advdetect.inference import batched_logits, select_device
from advdetect.models import LoadedModel, ModelOptions, load_model
from advdetect.progress import progress
from advdetect.records import AttackRecord, RunInfo, derive_seed
from advdetect.rundir import RUN_JSON, cell_paths, json_sha256, read_run, sample_arrays, update_run, write_manifest
from advdetect.storage import save_arrays, write_json
from advdetect.suite import AttackCell, Suite

log = logging.getLogger(__name__)

#: Fewest clean reference inputs an audit accepts (detectors fit class statistics on them).
MIN_REFERENCE = 20


@dataclass
class Position:
    """Where an audit is, so an interruption can say where it stopped."""

    stage: str = "load"
    cell: str | None = None
    done: int = 0
    total: int = 0

    def describe(self) -> str:
        where = f"the {self.stage} stage"
        if self.cell:
            where += f", cell {self.cell} ({self.done} of {self.total} cells done)"
        return where


POSITION = Position()


@dataclass(frozen=True)
class AuditOptions:
    suite: Suite
    model: str = "default"
    model_options: ModelOptions = ModelOptions()
    data: str = "default"
    n: int | None = 256
    image_size: int | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 128
    fit_fraction: float = 0.2
    #: None: every registered detector, then the suite's variants
    detectors: tuple[str, ...] | None = None
    n_reference: int = 256
    noisy_negatives: bool = False
    cache_dir: Path | None = None  # None: no cache

    def detector_names(self) -> tuple[str, ...]:
        if self.detectors is not None:
            return self.detectors
        return (*sorted(DETECTORS), *(v.name for v in self.suite.detectors))


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("advdetect", "torch", "torchattacks", "scikit-learn", "numpy", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def check_model_output(model: nn.Module, inputs: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """The model's logits on ``inputs``; a UsageError unless they are one finite floating tensor
    [N, C] with C >= 2."""
    try:
        with torch.no_grad():
            logits = model(inputs.to(device))
    except Exception as exc:
        raise UsageError(f"the model cannot take inputs of shape {list(inputs.shape[1:])} ({what}): "
                         f"{_first_line(exc)}") from None
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


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed must be a whole number from 0 to {2**32 - 1}; got {seed}")


def check_device(requested: str) -> torch.device:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", requested):
        raise UsageError(f"--device {requested!r} is not one advdetect runs on; use auto, cpu, cuda or cuda:N")
    try:
        device = select_device(requested)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {requested!r} is not usable here ({_first_line(exc)}); use auto or cpu") from None
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
    model included; raises :class:`UsageError` before any work."""
    if options.n_reference < MIN_REFERENCE:
        raise UsageError(f"--n-reference must be at least {MIN_REFERENCE}; got {options.n_reference}")
    if not 0.0 < options.fit_fraction < 1.0:
        raise UsageError(f"--fit-fraction must lie strictly between 0 and 1; got {options.fit_fraction}")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1; got {options.batch_size}")
    check_seed(options.seed)
    variants = options.suite.detectors
    detectors = [build_detector(name, variants) for name in options.detector_names()]
    device = check_device(options.device)
    loaded = load_model(options.model, options.model_options)
    sample = load_data(options.data, DataOptions(n=options.n, seed=options.seed, image_size=options.image_size,
                                                 channels=loaded.info["input_channels"], n_reference=options.n_reference))
    loaded.module.to(device).eval()
    logits = check_compatible(loaded.module, sample, device, options.batch_size)
    if sample.info["n_reference"] < MIN_REFERENCE:
        raise UsageError(f"data {options.data!r} holds {sample.info['n_available']} inputs: after the {len(sample.y)} "
                         f"audited ones only {sample.info['n_reference']} remain for the clean reference set, and "
                         f"detectors need at least {MIN_REFERENCE}; lower --n")
    loaded.info["num_classes"] = int(logits.shape[1])
    for name, detector in zip(options.detector_names(), detectors):
        try:
            detector.check_model(loaded.module)
        except ValueError as exc:
            raise UsageError(f"detector {name}: {exc}") from None
    correct = logits.argmax(dim=1) == sample.y
    if correct.any():
        probe_attacks(loaded.module, options.suite.cells(), sample.x[correct][:1], sample.y[correct][:1],
                      num_classes=loaded.info["num_classes"], seed=options.seed)
    return Prepared(loaded, sample, device, logits)


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
            with _SeededRNG(seed, device):
                adversarial = attack(x.to(device), y.to(device))
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"attack {cell.key} cannot run with {params}: {_first_line(exc)}") from None
        if not isinstance(adversarial, torch.Tensor) or adversarial.shape != x.shape:
            raise UsageError(f"attack {cell.key} returned {type(adversarial).__name__} instead of inputs shaped like "
                             f"its {tuple(x.shape)}")


def start_run(run_dir: Path, options: AuditOptions, prepared: Prepared, cells: list[tuple[str, str]]) -> RunInfo:
    """Stage 0: record the run and its sample in the claimed folder."""
    started = time.perf_counter()
    loaded, sample = prepared.loaded, prepared.sample
    pred = prepared.logits.argmax(dim=1)
    save_arrays(run_dir / "sample.npz", x=sample.x.numpy(), y=sample.y.numpy(), pred=pred.numpy(),
                logits=prepared.logits.numpy())
    save_arrays(run_dir / "reference.npz", x=sample.reference_x.numpy(), y=sample.reference_y.numpy())
    info = RunInfo(
        suite={"name": options.suite.name, "source": options.suite.source, "document": options.suite.to_dict()},
        model=loaded.info, data=sample.info, seed=options.seed, device=str(prepared.device),
        batch_size=options.batch_size, fit_fraction=options.fit_fraction, detectors=list(options.detector_names()),
        noisy_negatives=options.noisy_negatives,
        cache_dir=None if options.cache_dir is None else str(options.cache_dir),
        clean_accuracy=float((pred == sample.y).double().mean()), versions=package_versions(),
        started_at=now(),
        timings={"load": round(time.perf_counter() - started, 3)},
        cells=[list(cell) for cell in cells],
    )
    write_json(run_dir / RUN_JSON, info.to_dict())
    write_manifest(run_dir, status="running", started_at=info.started_at, suite=options.suite.name,
                   suite_sha256=json_sha256(options.suite.to_dict()), model_spec=loaded.info["spec"],
                   model_sha256=loaded.info["sha256"], data_spec=sample.info["spec"],
                   data_sha256=tensor_sha256(sample.x, sample.y), n=len(sample.y), seed=options.seed,
                   device=str(prepared.device), versions=info.versions, clean_accuracy=info.clean_accuracy)
    return info


def logits_sha256(logits: np.ndarray) -> str:
    """What the model computes on the audited inputs, to 4 decimals: two models with the same
    weights but another forward differ here."""
    return hashlib.sha256(np.round(logits.astype(np.float64), 4).tobytes()).hexdigest()


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


class _SeededRNG:
    """Fork torch's and NumPy's global RNGs for one cell: torchattacks' APGD, Square and
    AutoAttack reseed the global RNG, which must not leak into the next cell."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.devices = seed, [device] if device.type == "cuda" else []

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        self._numpy_state = np.random.get_state()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        np.random.set_state(self._numpy_state)
        self._fork.__exit__(*exc)


def resolved_params(cell: AttackCell, *, num_classes: int, seed: int) -> dict:
    """The cell's constructor parameters, with the class count and seed filled in where the attack takes them."""
    entry = get_attack(cell.attack_name)
    params = cell.constructor_params()
    if "n_classes" in entry.keywords and "n_classes" not in params:
        params["n_classes"] = num_classes
    if "seed" in entry.keywords and "seed" not in params:
        params["seed"] = seed
    return params


def attack_cell(model: nn.Module, cell: AttackCell, x: torch.Tensor, y: torch.Tensor, *,
                num_classes: int, seed: int, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Attack ``x`` (inputs the model classifies correctly) at one strength; returns the
    adversarial inputs on the CPU and the constructor parameters actually used."""
    entry = get_attack(cell.attack_name)
    params = resolved_params(cell, num_classes=num_classes, seed=seed)
    device = next(model.parameters()).device
    try:
        attack = entry.build(model, **params)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"attack {cell.key}: {exc}") from None
    outputs = []
    with _SeededRNG(seed, device):
        for start in progress(range(0, len(x), batch_size), desc=cell.key, unit="batch", leave=False):
            adv = attack(x[start : start + batch_size].to(device), y[start : start + batch_size].to(device))
            outputs.append(adv.detach().cpu().float())
    adversarial = torch.cat(outputs) if outputs else torch.zeros_like(x)
    if adversarial.shape != x.shape or not torch.isfinite(adversarial).all():
        raise UsageError(f"attack {cell.key} returned inputs of another shape or non-finite values; the model's "
                         f"gradients may be NaN on some inputs")
    return adversarial, params


def attack_stage(run_dir: Path, model: nn.Module, cells: list[AttackCell]) -> list[AttackRecord]:
    """Stage 1: every cell's adversarial inputs, from the inputs the model classifies correctly."""
    info = read_run(run_dir)
    sample = sample_arrays(run_dir)
    correct = np.flatnonzero(sample["pred"] == sample["y"])
    x, y = torch.from_numpy(sample["x"][correct]), torch.from_numpy(sample["y"][correct])
    cache = AttackCache(Path(info.cache_dir)) if info.cache_dir else None
    inputs_sha256 = tensor_sha256(x, y)
    computes = logits_sha256(sample["logits"][correct])
    device = next(model.parameters()).device
    started, records, hits = time.perf_counter(), [], 0
    for done, cell in enumerate(progress(cells, desc="attack", unit="cell")):
        POSITION.cell, POSITION.done, POSITION.total = cell.key, done, len(cells)
        cell_started = time.perf_counter()
        seed = derive_seed(info.seed, "attack", cell.key)
        params = resolved_params(cell, num_classes=info.model["num_classes"], seed=seed)
        key = (cache.key(model=info.model["sha256"], logits=computes, inputs=inputs_sha256, attack=cell.attack_name,
                         params=params, seed=seed, batch_size=info.batch_size, device=device.type) if cache else "")
        adversarial = cache.load(key, x) if cache else None
        if adversarial is None:
            adversarial, params = attack_cell(model, cell, x, y, num_classes=info.model["num_classes"],
                                              seed=seed, batch_size=info.batch_size)
            if cache:
                cache.store(key, adversarial)
        else:
            hits += 1
        logits = batched_logits(model, adversarial, info.batch_size)
        if not torch.isfinite(logits).all():
            raise UsageError(f"the model returns NaN or infinite logits on adversarial inputs of {cell.key}; "
                             f"whether the attack fooled it cannot be told")
        pred = logits.argmax(dim=1)
        fooled = (pred != y).numpy()
        delta = (adversarial - x).flatten(1)[torch.from_numpy(fooled)]
        linf, l2 = delta.abs().amax(dim=1).double(), delta.norm(dim=1).double()

        def stat(values: torch.Tensor, how: str) -> float | None:
            return float(getattr(values, how)()) if len(values) else None

        record = AttackRecord(
            key=cell.key, slug=cell.slug, attack=cell.attack, attack_name=cell.attack_name,
            strength_name=cell.strength_name, strength=cell.strength, params=params, seed=seed,
            n_attacked=len(correct), n_fooled=int(fooled.sum()),
            attack_success_rate=float(fooled.mean()) if len(correct) else None,
            mean_linf=stat(linf, "mean"), max_linf=stat(linf, "max"), mean_l2=stat(l2, "mean"), max_l2=stat(l2, "max"),
            seconds=round(time.perf_counter() - cell_started, 3),
        )
        record_path, arrays_path = cell_paths(run_dir, cell.slug)
        save_arrays(arrays_path, source_index=correct, x_adv=adversarial.numpy(), pred=pred.numpy(), fooled=fooled)
        write_json(record_path, record.to_dict())
        records.append(record)
    update_run(run_dir, ("attack", time.perf_counter() - started), attack_cache_hits=hits if cache else None)
    if cache:
        log.info("%d of %d attack cells came from the cache in %s", hits, len(cells), cache.root)
    return records
