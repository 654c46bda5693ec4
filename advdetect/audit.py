"""The audit pipeline: attack -> detect -> report, each stage reading and writing the run folder
(see :mod:`advdetect.records`), so any stage can be rerun alone."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advdetect.attacks import get_attack
from advdetect.cache import AttackCache, tensor_sha256
from advdetect.datasets import DataOptions, DataSample, load_data
from advdetect.detectors import DETECTORS, get_detector
from advdetect.errors import UsageError
from advdetect.history import json_sha256, now, write_manifest
from advdetect.inference import batched_logits, select_device
from advdetect.models import LoadedModel, ModelOptions, load_model
from advdetect.progress import progress
from advdetect.records import AttackRecord, RunInfo, derive_seed
from advdetect.storage import load_arrays, read_json, save_arrays, write_json
from advdetect.suite import AttackCell, Suite, suite_from_document

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


def check_compatible(model: nn.Module, sample: DataSample, device: torch.device) -> int:
    """Number of model outputs, after checking that the model accepts the data; a clear
    error before any attack runs otherwise."""
    if sample.x.ndim != 4:
        raise UsageError(f"data must be images [N, C, H, W]; got shape {tuple(sample.x.shape)}")
    low, high = float(sample.x.min()), float(sample.x.max())
    if low < 0.0 or high > 1.0:
        raise UsageError(f"data values must lie in [0, 1]; found [{low:.3g}, {high:.3g}]")
    try:
        with torch.no_grad():
            logits = model(sample.x[:2].to(device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"the model cannot take inputs of shape {list(sample.x.shape[1:])}: {first}") from None
    if logits.ndim != 2:
        raise UsageError(f"the model must return logits [N, classes]; it returned shape {tuple(logits.shape)}")
    num_classes = int(logits.shape[1])
    if int(sample.y.max()) >= num_classes:
        raise UsageError(f"the data has labels up to {int(sample.y.max())} but the model outputs only {num_classes} classes")
    return num_classes


def prepare(options: AuditOptions) -> tuple[LoadedModel, DataSample, torch.device]:
    """Load and check everything an audit needs; raises :class:`UsageError` before any work."""
    if options.n_reference < MIN_REFERENCE:
        raise UsageError(f"--n-reference must be at least {MIN_REFERENCE}; got {options.n_reference}")
    variants = {v.name for v in options.suite.detectors}
    for name in options.detector_names():
        if name not in variants:
            get_detector(name)
    if not 0.0 < options.fit_fraction < 1.0:
        raise UsageError(f"--fit-fraction must lie strictly between 0 and 1; got {options.fit_fraction}")
    try:
        device = select_device(options.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"device {options.device!r} is not usable here ({exc}); use auto, cpu or cuda") from None
    loaded = load_model(options.model, options.model_options)
    sample = load_data(options.data, DataOptions(n=options.n, seed=options.seed, image_size=options.image_size,
                                                 channels=loaded.info["input_channels"], n_reference=options.n_reference))
    loaded.module.to(device).eval()
    loaded.info["num_classes"] = check_compatible(loaded.module, sample, device)
    if sample.info["n_reference"] < MIN_REFERENCE:
        raise UsageError(f"data {options.data!r} holds {sample.info['n_available']} inputs: after the {len(sample.y)} "
                         f"audited ones only {sample.info['n_reference']} remain for the clean reference set, and "
                         f"detectors need at least {MIN_REFERENCE}; lower --n")
    return loaded, sample, device


def start_run(run_dir: Path, options: AuditOptions, loaded: LoadedModel, sample: DataSample, device: torch.device) -> RunInfo:
    """Stage 0: classify the sample and record the run."""
    started = time.perf_counter()
    pred = batched_logits(loaded.module, sample.x, options.batch_size).argmax(dim=1)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_arrays(run_dir / "sample.npz", x=sample.x.numpy(), y=sample.y.numpy(), pred=pred.numpy())
    save_arrays(run_dir / "reference.npz", x=sample.reference_x.numpy(), y=sample.reference_y.numpy())
    info = RunInfo(
        suite={"name": options.suite.name, "source": options.suite.source, "document": options.suite.to_dict()},
        model=loaded.info, data=sample.info, seed=options.seed, device=str(device),
        batch_size=options.batch_size, fit_fraction=options.fit_fraction, detectors=list(options.detector_names()),
        noisy_negatives=options.noisy_negatives,
        cache_dir=None if options.cache_dir is None else str(options.cache_dir),
        clean_accuracy=float((pred == sample.y).double().mean()), versions=package_versions(),
        started_at=now(),
        timings={"load": round(time.perf_counter() - started, 3)},
    )
    write_json(run_dir / "run.json", info.to_dict())
    write_manifest(run_dir, status="running", started_at=info.started_at, suite=options.suite.name,
                   suite_sha256=json_sha256(options.suite.to_dict()), model_spec=loaded.info["spec"],
                   model_sha256=loaded.info["sha256"], data_spec=sample.info["spec"],
                   data_sha256=tensor_sha256(sample.x, sample.y), n=len(sample.y), seed=options.seed,
                   device=str(device), versions=info.versions, clean_accuracy=info.clean_accuracy)
    return info


def read_run(run_dir: Path) -> RunInfo:
    path = run_dir / "run.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} is not an audit run folder (no run.json); run 'advdetect audit' first")
    return RunInfo.from_dict(read_json(path))


def update_run(run_dir: Path, timing: tuple[str, float] | None = None, **fields: object) -> RunInfo:
    """Record a stage's seconds and/or other fields in run.json."""
    info = read_run(run_dir)
    if timing:
        info.timings[timing[0]] = round(timing[1], 3)
    for name, value in fields.items():
        setattr(info, name, value)
    write_json(run_dir / "run.json", info.to_dict())
    return info


def reload_model(info: RunInfo) -> nn.Module:
    """The audited model, for rerunning a stage alone."""
    loaded = load_model(info.model["spec"], ModelOptions.from_dict(info.model["options"]))
    if loaded.info["sha256"] != info.model["sha256"]:
        raise UsageError(f"the model behind {info.model['spec']!r} changed since this run; start a new audit")
    return loaded.module.to(select_device("auto")).eval()


def run_suite(info: RunInfo) -> Suite:
    return suite_from_document(info.suite["document"], info.suite["name"], info.suite["source"])


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
        raise RuntimeError(f"attack {cell.key} returned inputs of another shape or non-finite values")
    return adversarial, params


def attack_stage(run_dir: Path, model: nn.Module, cells: list[AttackCell]) -> list[AttackRecord]:
    """Stage 1: every cell's adversarial inputs, from the inputs the model classifies correctly."""
    info = read_run(run_dir)
    sample = load_arrays(run_dir / "sample.npz")
    correct = np.flatnonzero(sample["pred"] == sample["y"])
    x, y = torch.from_numpy(sample["x"][correct]), torch.from_numpy(sample["y"][correct])
    cache = AttackCache(Path(info.cache_dir)) if info.cache_dir else None
    inputs_sha256 = tensor_sha256(x, y)
    device = next(model.parameters()).device
    started, records, hits = time.perf_counter(), [], 0
    for done, cell in enumerate(progress(cells, desc="attack", unit="cell")):
        POSITION.cell, POSITION.done, POSITION.total = cell.key, done, len(cells)
        cell_started = time.perf_counter()
        seed = derive_seed(info.seed, "attack", cell.key)
        params = resolved_params(cell, num_classes=info.model["num_classes"], seed=seed)
        key = (cache.key(model=info.model["sha256"], inputs=inputs_sha256, attack=cell.attack_name, params=params,
                         seed=seed, batch_size=info.batch_size, device=device.type) if cache else "")
        adversarial = cache.load(key, x) if cache else None
        if adversarial is None:
            adversarial, params = attack_cell(model, cell, x, y, num_classes=info.model["num_classes"],
                                              seed=seed, batch_size=info.batch_size)
            if cache:
                cache.store(key, adversarial)
        else:
            hits += 1
        pred = batched_logits(model, adversarial, info.batch_size).argmax(dim=1)
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
        save_arrays(run_dir / "adversarial" / f"{cell.slug}.npz", source_index=correct, x_adv=adversarial.numpy(),
                    pred=pred.numpy(), fooled=fooled)
        write_json(run_dir / "adversarial" / f"{cell.slug}.json", record.to_dict())
        records.append(record)
    update_run(run_dir, ("attack", time.perf_counter() - started), attack_cache_hits=hits if cache else None)
    if cache:
        log.info("%d of %d attack cells came from the cache in %s", hits, len(cells), cache.root)
    return records


def cell_slugs(info: RunInfo) -> list[tuple[str, str]]:
    """(key, slug) of the run's cells: the suite's attack cells, or an OOD run's sets."""
    if "ood_sets" in info.suite:
        return [(f"ood[{name}]", f"ood_{name}") for name in info.suite["ood_sets"]]
    return [(cell.key, cell.slug) for cell in run_suite(info).cells()]


def detector_variants(info: RunInfo) -> tuple:
    return () if "ood_sets" in info.suite else run_suite(info).detectors


def read_attack_records(run_dir: Path) -> list[AttackRecord]:
    records = []
    for key, slug in cell_slugs(read_run(run_dir)):
        path = run_dir / "adversarial" / f"{slug}.json"
        if not path.is_file():
            raise UsageError(f"{run_dir}: cell {key} has no results; rerun the attack stage")
        records.append(AttackRecord.from_dict(read_json(path)))
    return records
