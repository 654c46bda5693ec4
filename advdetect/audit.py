"""The audit pipeline: attack -> detect -> report, each stage reading and writing the run folder
(see :mod:`advdetect.records`), so any stage can be rerun alone."""

from __future__ import annotations

import logging
import math
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
from advdetect.detectors import get_detector
from advdetect.errors import UsageError
from advdetect.history import json_sha256, now, write_manifest
from advdetect.inference import batched_logits, select_device
from advdetect.metrics import bootstrap_auroc_ci, detection_metrics
from advdetect.models import LoadedModel, ModelOptions, load_model
from advdetect.progress import progress
from advdetect.records import AttackRecord, ResultRow, RunInfo, derive_seed
from advdetect.storage import load_arrays, read_json, save_arrays, write_json
from advdetect.suite import AttackCell, Suite, suite_from_document

log = logging.getLogger(__name__)

DEFAULT_DETECTORS = ("confounding_gradient", "msp")
#: Below this many (clean, adversarial) pairs a detector is not fitted, or not scored.
MIN_FIT_PAIRS = 5
MIN_TEST_PAIRS = 10
PROTOCOL_SEEN = "seen"


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
    fit_fraction: float = 0.1
    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    cache_dir: Path | None = None  # None: no cache


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
    for name in options.detectors:
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
                                                 channels=loaded.info["input_channels"]))
    loaded.module.to(device).eval()
    loaded.info["num_classes"] = check_compatible(loaded.module, sample, device)
    return loaded, sample, device


def start_run(run_dir: Path, options: AuditOptions, loaded: LoadedModel, sample: DataSample, device: torch.device) -> RunInfo:
    """Stage 0: classify the sample and record the run."""
    started = time.perf_counter()
    pred = batched_logits(loaded.module, sample.x, options.batch_size).argmax(dim=1)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_arrays(run_dir / "sample.npz", x=sample.x.numpy(), y=sample.y.numpy(), pred=pred.numpy())
    info = RunInfo(
        suite={"name": options.suite.name, "source": options.suite.source, "document": options.suite.to_dict()},
        model=loaded.info, data=sample.info, seed=options.seed, device=str(device),
        batch_size=options.batch_size, fit_fraction=options.fit_fraction, detectors=list(options.detectors),
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


def read_attack_records(run_dir: Path) -> list[AttackRecord]:
    records = []
    for cell in run_suite(read_run(run_dir)).cells():
        path = run_dir / "adversarial" / f"{cell.slug}.json"
        if not path.is_file():
            raise UsageError(f"{run_dir}: attack cell {cell.key} has no results; rerun the attack stage")
        records.append(AttackRecord.from_dict(read_json(path)))
    return records


def detect_stage(run_dir: Path, model: nn.Module, records: list[AttackRecord]) -> list[ResultRow]:
    """Stage 2, protocol ``seen``: per cell, the (clean, adversarial) pairs of source inputs the
    attack fooled, split by source input into a fitting part (``fit_fraction``) and a test part."""
    info = read_run(run_dir)
    sample = load_arrays(run_dir / "sample.npz")
    correct = np.flatnonzero(sample["pred"] == sample["y"])
    clean_inputs = torch.from_numpy(sample["x"][correct])
    started = time.perf_counter()
    detectors = {name: get_detector(name)() for name in info.detectors}
    clean_signatures = {name: det.signatures(model, clean_inputs, batch_size=info.batch_size)
                        for name, det in progress(detectors.items(), desc="clean signatures", unit="detector", leave=False)}
    rows: list[ResultRow] = []
    for done, record in enumerate(progress(records, desc="detect", unit="cell")):
        POSITION.cell, POSITION.done, POSITION.total = record.key, done, len(records)
        arrays = load_arrays(run_dir / "adversarial" / f"{record.slug}.npz")
        pairs = np.flatnonzero(arrays["fooled"])  # positions among the correctly classified inputs
        order = np.random.default_rng(derive_seed(info.seed, "split", record.key)).permutation(pairs)
        n_fit = math.ceil(info.fit_fraction * len(order)) if len(order) else 0
        fit, test = order[:n_fit], order[n_fit:]
        adversarial_inputs = torch.from_numpy(arrays["x_adv"])
        scores: dict[str, np.ndarray] = {}
        for name, detector_prototype in detectors.items():
            detector = type(detector_prototype)()
            row = ResultRow(attack=record.attack, strength_name=record.strength_name, strength=record.strength,
                            detector=name, protocol=PROTOCOL_SEEN, n_clean=len(test), n_adv=len(test),
                            n_fit=len(fit) if detector.needs_adversarial else 0,
                            attack_success_rate=record.attack_success_rate)
            reason = _too_few(record, len(fit), len(test), detector.needs_adversarial)
            if reason:
                row.reason = reason
                rows.append(row)
                continue
            adversarial_signatures = np.empty((len(arrays["fooled"]),) + clean_signatures[name].shape[1:])
            adversarial_signatures[pairs] = detector.signatures(model, adversarial_inputs[pairs], batch_size=info.batch_size)
            clean = clean_signatures[name]
            if detector.needs_adversarial:
                detector.fit(clean[fit], adversarial_signatures[fit])
                row.detector_params = detector.fitted_params()
            clean_scores, adversarial_scores = detector.score(clean[test]), detector.score(adversarial_signatures[test])
            for metric, value in detection_metrics(clean_scores, adversarial_scores).items():
                setattr(row, metric, value)
            row.auroc_ci_low, row.auroc_ci_high = bootstrap_auroc_ci(
                clean_scores, adversarial_scores, seed=derive_seed(info.seed, "bootstrap", record.key, name))
            scores[f"{name}__clean"], scores[f"{name}__adversarial"] = clean_scores, adversarial_scores
            rows.append(row)
        save_arrays(run_dir / "scores" / f"{record.slug}.npz", **scores)
    write_json(run_dir / "detection.json", [row.to_dict() for row in rows])
    update_run(run_dir, ("detect", time.perf_counter() - started))
    return rows


def _too_few(record: AttackRecord, n_fit: int, n_test: int, needs_fit: bool) -> str | None:
    if record.n_fooled == 0:
        return f"the attack fooled none of the {record.n_attacked} correctly classified inputs"
    if n_test < MIN_TEST_PAIRS or (needs_fit and n_fit < MIN_FIT_PAIRS):
        need = f"{MIN_FIT_PAIRS} to fit and {MIN_TEST_PAIRS} to test" if needs_fit else f"{MIN_TEST_PAIRS} to test"
        return (f"too few adversarial examples: the attack fooled {record.n_fooled} of {record.n_attacked} inputs "
                f"({n_fit} pairs to fit, {n_test} to test); the detector needs at least {need} "
                f"(raise --n or the strength)")
    return None
