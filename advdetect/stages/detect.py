"""Stage 2, detection: every detector on every attack cell, under three protocols.

The correctly classified audited inputs are split once, by source input, into a calibration
part (``fit_fraction``) and a test part; every cell tests on the (clean, adversarial) pairs of
test sources the attack fooled, so rows are comparable across detectors and protocols.

- ``seen``: supervised detectors fit on the cell's own calibration pairs (the attack is known).
- ``unseen``: they fit once, on the calibration pairs of the suite's first attack at its middle
  strength, and score every other cell (the attack is not known in advance).
- ``oneclass``: detectors that can fit without adversarial examples fit on the clean reference
  inputs alone (no adversarial example at hand).

With ``fit_folds`` K >= 2 the split is K folds instead (cross-fitting): each fold's pairs are
tested by supervised detectors fitted on the other folds' pairs, so every fooled pair is tested
and (K-1)/K of them fit, more fitting pairs without a smaller test set; the AUROC is that of the
pooled out-of-fold scores. The ``unseen`` fits take the other folds of the source cell.

Detectors that use no adversarial examples fit on the reference inputs under ``seen`` too. With
``noisy_negatives`` (the control of Feinman et al. 2017 and Ma et al. 2018), each clean input
gets a Gaussian-noise copy as far from it in L2 as its adversarial example, and the negatives
of both fitting and testing are the clean inputs and these copies.

Each detector goes through the calls of a standalone one (:meth:`~advdetect.detectors.Detector.fit`
and :meth:`~advdetect.detectors.Detector.predict` on inputs): :meth:`~advdetect.detectors.Detector.prepare`
on the reference inputs, then :meth:`~advdetect.detectors.Detector.fit_signatures` and
:meth:`~advdetect.detectors.Detector.score_samples` on signatures, which the stage computes once per
input set and signature block (:class:`Signatures`) instead of once per fit. Detectors that read one
plain forward pass share it (:attr:`~advdetect.detectors.Detector.plain_forward_only`), a fit that
learns nothing from clean signatures gets none (:attr:`~advdetect.detectors.Detector.learns_from_clean`),
and the ``unseen`` rows reuse the ``seen`` fit on their source cell.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from advdetect.detectors import Detector, DetectorVariant, SignatureFunction, build_detector
from advdetect.signatures.activations import PlainForward, plain_forward
from advdetect.signatures.passes import PassCounter
from advdetect.stages.distributed import current_world
from advdetect.errors import Unavailable
from advdetect.run.metrics import bootstrap_auroc_ci, detection_metrics
from advdetect.progress import Progress, no_progress, progress
from advdetect.run.records import PROTOCOLS, AttackRecord, ResultRow, RunInfo, derive_seed
from advdetect.run.splits import fit_rounds
from advdetect.run.folder import (COMPLETE, RUNNING, cell_arrays, computed_from, read_run, record_files,
                                  reference_arrays, sample_arrays, set_stage, update_run)
from advdetect.run.storage import save_arrays, write_json

log = logging.getLogger(__name__)

#: Below this many (clean, adversarial) pairs a detector is not fitted, or not scored.
MIN_FIT_PAIRS = 5
MIN_TEST_PAIRS = 10


def detect_stage(run_dir: Path, model: nn.Module, records: list[AttackRecord],
                 on_progress: Progress = no_progress) -> list[ResultRow]:
    """Every detector under each of its protocols on every cell: ``detection.json`` and ``scores/``."""
    info = read_run(run_dir)
    inputs = StageInputs.read(run_dir, info, records)
    set_stage(run_dir, "detect", RUNNING)
    started = time.perf_counter()
    signatures = Signatures(model, info.batch_size)
    spent = Spent(model)
    detectors = prepare_detectors(info, model, inputs, signatures, spent)
    source = unseen_source(records)
    work = [(name, protocol, cell)
            for name, detector in detectors.items() for protocol in protocols_of(detector.detector)
            for cell in inputs.cells if not (protocol == "unseen" and cell.record is source)]
    rows: list[ResultRow] = []
    scores: dict[str, dict[str, np.ndarray]] = {r.key: {} for r in records}
    for done, (name, protocol, cell) in enumerate(progress(work, desc="detect", unit="row")):
        on_progress("detect", f"{name}, {protocol}, {cell.record.key}", done, len(work))
        fit_cell = inputs.cell(source) if protocol == "unseen" else cell
        with spent.on(name):
            row, row_scores = evaluate(detectors[name], protocol, cell, fit_cell, inputs, signatures, info,
                                       keep=fit_cell.record is source)
        rows.append(row)
        scores[cell.record.key].update(row_scores)
    write_detection(run_dir, info, records, rows, scores)
    update_run(run_dir, ("detect", time.perf_counter() - started),
               detector_timings={name: round(value, 3) for name, value in spent.seconds.items()},
               detector_passes=spent.passes)
    set_stage(run_dir, "detect", COMPLETE)
    return rows


@dataclass
class StageInputs:
    """What the detect stage reads from the run folder: the correctly classified clean inputs, the
    reference inputs and every cell, split once into calibration and test pairs."""

    clean: torch.Tensor
    reference: torch.Tensor
    reference_labels: torch.Tensor
    cells: list[Cell]

    @classmethod
    def read(cls, run_dir: Path, info: RunInfo, records: list[AttackRecord]) -> StageInputs:
        sample = sample_arrays(run_dir)
        image_shape = sample["x"].shape[1:]
        reference = reference_arrays(run_dir, image_shape)
        correct = np.flatnonzero(sample["pred"] == sample["y"])
        clean = torch.from_numpy(sample["x"][correct])
        rounds = fit_rounds(info, len(correct))
        cells = [Cell(r, cell_arrays(run_dir, r, len(correct), image_shape), rounds, info.seed,
                      info.noisy_negatives, clean) for r in records]
        return cls(clean, torch.from_numpy(reference["x"]), torch.from_numpy(reference["y"]), cells)

    def cell(self, record: AttackRecord) -> Cell:
        return next(c for c in self.cells if c.record is record)


@dataclass
class PreparedDetector:
    """A detector of the run under its name, what it was last fitted on, or why it cannot run."""

    name: str
    detector: Detector
    unavailable: str | None = None
    fitted_on: str | None = None
    kept: dict[str, Detector] = field(default_factory=dict)

    def fitted(self, on: str, clean: np.ndarray, adversarial: np.ndarray | None = None, *,
               keep: bool = False) -> Detector:
        """The detector fitted on ``on`` (the reference set, or one cell's calibration pairs of one
        round): fitted now unless it was fitted on ``on`` last or kept from then (``keep``: a fit
        that later cells need again, as the fits on the unseen protocol's source cell)."""
        if on in self.kept:
            return self.kept[on]
        if self.fitted_on != on:
            self.detector.fit_signatures(clean, adversarial)
            self.fitted_on = on
        if keep:
            self.kept[on] = copy.deepcopy(self.detector)
        return self.detector


def run_variants(info: RunInfo) -> list[DetectorVariant]:
    """The suite's detector variants, as run.json records them (an OOD run has none)."""
    tables = info.suite.get("document", {}).get("detector", {})
    return [DetectorVariant.from_dict(name, table) for name, table in tables.items()]


@dataclass
class Spent:
    """What each detector cost the detect stage: seconds, and the model's forward and backward
    passes per input (:class:`~advdetect.signatures.passes.PassCounter`; a pass stopped partway, as
    Mahalanobis' noisy copies, is not counted). Work shared by several detectors (a signature block,
    one plain forward pass) is charged to the first that needs it. With torchrun, each process
    counts its own share."""

    model: nn.Module
    seconds: dict[str, float] = field(default_factory=dict)
    passes: dict[str, dict[str, int]] = field(default_factory=dict)

    @contextlib.contextmanager
    def on(self, name: str) -> Iterator[None]:
        """Charge the block's wall time and passes to detector ``name``."""
        started = time.perf_counter()
        counter = PassCounter(self.model)
        try:
            with counter:
                yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            spent = self.passes.setdefault(name, {"forward": 0, "backward": 0})
            spent["forward"] += counter.forward
            spent["backward"] += counter.backward


def prepare_detectors(info: RunInfo, model: nn.Module, inputs: StageInputs, signatures: Signatures,
                      spent: Spent) -> dict[str, PreparedDetector]:
    """Every detector of the run, prepared on the reference inputs with its clean signatures
    computed; one that cannot run on this model keeps the reason. Charges each one's work to ``spent``."""
    variants = run_variants(info)
    prepared = {}
    for name in progress(info.detectors, desc="prepare detectors", unit="detector", leave=False):
        entry = PreparedDetector(name, build_detector(name, variants))
        try:
            with spent.on(name):
                entry.detector.prepare(model, inputs.reference, inputs.reference_labels, batch_size=info.batch_size)
                signatures.get(entry.detector, "clean", inputs.clean)
        except Unavailable as exc:
            entry.unavailable = f"{name} cannot run on this model: {exc}"
            log.warning(entry.unavailable)
        prepared[name] = entry
    return prepared


def evaluate(entry: PreparedDetector, protocol: str, cell: Cell, fit_cell: Cell, inputs: StageInputs,
             signatures: Signatures, info: RunInfo, *, keep: bool = False) -> tuple[ResultRow, dict[str, np.ndarray]]:
    """One detector under one protocol on one cell: its result row and its test scores. ``keep``:
    keep the supervised fits on ``fit_cell`` for later rows (those on the ``unseen`` protocol's
    source cell, which its ``seen`` row fits first and every ``unseen`` row fits again)."""
    detector, record, name = entry.detector, cell.record, entry.name
    supervised = detector.uses_adversarial and protocol != "oneclass"
    n_fit = fit_cell.n_fit if supervised else 0
    row = ResultRow(attack=record.attack, strength_name=record.strength_name, strength=record.strength, detector=name,
                    protocol=protocol, n_clean=cell.n_negatives(cell.test), n_adv=len(cell.test), n_fit=n_fit,
                    attack_success_rate=record.attack_success_rate,
                    negatives="clean+noise" if info.noisy_negatives else "clean")
    row.reason = entry.unavailable or _too_few(record, len(cell.test), fit_cell.record, n_fit, supervised)
    if row.reason:
        return row, {}
    if supervised:
        clean_scores, adversarial_scores, row.detector_params = supervised_scores(entry, cell, fit_cell, signatures,
                                                                                  keep=keep)
    else:
        clean_scores, adversarial_scores, row.detector_params = reference_scores(entry, cell, inputs, signatures)
    if protocol == "unseen":
        row.detector_params["fitted_on"] = fit_cell.record.key
    bad = int((~np.isfinite(clean_scores)).sum() + (~np.isfinite(adversarial_scores)).sum())
    if bad:
        row.reason = f"{name} gave NaN or infinite scores to {bad} test inputs, so no metric is reported"
        row.detector_params = {}
        log.warning("%s on %s: %s", name, record.key, row.reason)
        return row, {}
    add_metrics(row, clean_scores, adversarial_scores, seed=derive_seed(info.seed, "bootstrap", record.key, name,
                                                                        protocol))
    return row, {f"{protocol}__{name}__clean": clean_scores, f"{protocol}__{name}__adversarial": adversarial_scores}


Scored = tuple[np.ndarray, np.ndarray, dict]


def supervised_scores(entry: PreparedDetector, cell: Cell, fit_cell: Cell, signatures: Signatures, *,
                      keep: bool) -> Scored:
    """Clean and adversarial test scores of ``cell`` from one fit per round on ``fit_cell``'s
    calibration pairs (one round without cross-fitting), each scoring its round's test pairs;
    with the fitted parameters, listed per round under cross-fitting."""
    detector = entry.detector
    parts, params = [], []
    for index, ((fit_rows, _), (_, test_rows)) in enumerate(zip(fit_cell.rounds, cell.rounds)):
        if not len(test_rows):  # a fold without a fooled input of this cell: nothing to score
            continue
        fitted = entry.fitted(f"{fit_cell.record.key}#{index}", fit_cell.negatives(signatures, detector, fit_rows),
                              fit_cell.adversarial(signatures, detector, fit_rows), keep=keep)
        params.append(fitted.fitted_params())
        parts.append((fitted.score_samples(cell.negatives(signatures, detector, test_rows)),
                      fitted.score_samples(cell.adversarial(signatures, detector, test_rows))))
    clean = np.concatenate([clean for clean, _ in parts])
    adversarial = np.concatenate([adversarial for _, adversarial in parts])
    return clean, adversarial, params[0] if len(cell.rounds) == 1 else {k: [p[k] for p in params] for k in params[0]}


def reference_scores(entry: PreparedDetector, cell: Cell, inputs: StageInputs, signatures: Signatures) -> Scored:
    """Clean and adversarial test scores of ``cell`` from the fit on the clean reference inputs,
    with the fitted parameters."""
    detector = entry.detector
    reference = signatures.get(detector, "reference", inputs.reference) if detector.learns_from_clean \
        else np.empty((0, 0))
    fitted = entry.fitted("reference", reference)
    return (fitted.score_samples(cell.negatives(signatures, detector, cell.test)),
            fitted.score_samples(cell.adversarial(signatures, detector, cell.test)), fitted.fitted_params())


def add_metrics(row: ResultRow, clean_scores: np.ndarray, adversarial_scores: np.ndarray, *, seed: int) -> None:
    """The detection metrics of the scores on ``row``, its undetected success rate and the AUROC's
    bootstrap interval (seeded by ``seed``)."""
    for metric, value in detection_metrics(clean_scores, adversarial_scores).items():
        setattr(row, metric, value)
    if row.attack_success_rate is not None:  # fooled, times the share of the fooled that pass
        row.undetected_success_rate = row.attack_success_rate * (1 - row.tpr_at_5fpr)  # type: ignore[operator]
    row.auroc_ci_low, row.auroc_ci_high = bootstrap_auroc_ci(clean_scores, adversarial_scores, seed=seed)


def write_detection(run_dir: Path, info: RunInfo, records: list[AttackRecord], rows: list[ResultRow],
                    scores: dict[str, dict[str, np.ndarray]]) -> None:
    """``scores/<cell>.npz``, then ``detection.json`` with its rows in cell, detector, protocol order."""
    for record in records:
        save_arrays(run_dir / "scores" / f"{record.slug}.npz", **scores[record.key])
    order = {(r.key, n, p): i for i, (r, n, p) in enumerate(
        (r, n, p) for r in records for n in info.detectors for p in PROTOCOLS)}
    key_of = {(r.attack, r.strength): r.key for r in records}
    rows.sort(key=lambda row: order[(key_of[(row.attack, row.strength)], row.detector, row.protocol)])
    write_json(run_dir / "detection.json", [row.to_dict() for row in rows])
    record_files(run_dir, {name: computed_from(records)
                           for name in ["detection.json", *(f"scores/{record.slug}.npz" for record in records)]})


def unseen_source(records: list[AttackRecord]) -> AttackRecord:
    """The suite's first attack at its middle strength."""
    first = [r for r in records if r.attack == records[0].attack]
    return first[len(first) // 2]


def noisy_copies(clean: torch.Tensor, adversarial: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian-noise copies of ``clean``, each as far from its source in L2 as its adversarial
    example is (before clipping to [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=generator)
    distance = (adversarial - clean).flatten(1).norm(dim=1)
    noise *= (distance / noise.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (clean.ndim - 1))
    return (clean + noise).clamp(0, 1)


def protocols_of(detector: Detector) -> list[str]:
    protocols = ["seen"]
    if detector.uses_adversarial:
        protocols.append("unseen")
    if not detector.needs_adversarial:
        protocols.append("oneclass")
    return protocols


@dataclass
class Signatures:
    """Signatures computed once per (signature key, input set) and shared by detectors; the plain
    forward passes of the detectors that read nothing else, once per input set for all of them."""

    model: nn.Module
    batch_size: int
    store: dict[tuple, np.ndarray] = field(default_factory=dict)
    #: per (input set, chunk): the plain forward pass over that chunk's inputs
    forwards: dict[tuple[str, int], PlainForward] = field(default_factory=dict)

    def get(self, detector: Detector, what: str, inputs: torch.Tensor) -> np.ndarray:
        """The signatures of ``inputs`` (named ``what``), ``detector.signatures(model, inputs)``:
        computed on first use block by block (:meth:`~advdetect.detectors.Detector.signature_blocks`,
        each block once for every detector that shares it), or from the plain forward pass that
        every :attr:`~advdetect.detectors.Detector.plain_forward_only` detector shares, in chunks of
        ``batch_size`` rows, shared among the ranks of a distributed audit."""
        key = (detector.signature_key(), what)
        if key not in self.store:
            if detector.plain_forward_only:
                self.store[key] = self._from_forward(detector, what, inputs)
            else:
                blocks = [self._block(block_key, compute, what, inputs)
                          for block_key, compute in detector.signature_blocks()]
                self.store[key] = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
        return self.store[key]

    def _block(self, block_key: tuple, compute: SignatureFunction, what: str, inputs: torch.Tensor) -> np.ndarray:
        key = (block_key, what)
        if key not in self.store:
            signatures = current_world().map_chunks(
                len(inputs), self.batch_size,
                lambda index, rows: compute(self.model, inputs[rows], batch_size=self.batch_size))
            self.store[key] = (compute(self.model, inputs, batch_size=self.batch_size)
                               if signatures is None else signatures)
        return self.store[key]

    def _from_forward(self, detector: Detector, what: str, inputs: torch.Tensor) -> np.ndarray:
        """``detector.signatures`` from the plain forward pass over each chunk, made on first use."""

        def compute(index: int, rows: slice) -> np.ndarray:
            if (what, index) not in self.forwards:
                self.forwards[(what, index)] = plain_forward(self.model, inputs[rows], self.batch_size)
            return detector.forward_signatures(self.model, self.forwards[(what, index)])

        signatures = current_world().map_chunks(len(inputs), self.batch_size, compute)
        return detector.signatures(self.model, inputs, batch_size=self.batch_size) if signatures is None else signatures


class Cell:
    """One cell's inputs, split into calibration and test pairs; its adversarial inputs' signatures
    are computed on first use, once for every detector that shares them."""

    def __init__(self, record: AttackRecord, arrays: dict[str, np.ndarray], rounds: list[tuple[np.ndarray, np.ndarray]],
                 seed: int, noisy: bool, clean_inputs: torch.Tensor) -> None:
        self.record, self.seed, self.noisy, self.clean_inputs = record, seed, noisy, clean_inputs
        fooled = arrays["fooled"]
        #: (fit, test) rows of the fooled pairs, per round (see :func:`fit_rounds`)
        self.rounds = [(np.flatnonzero(fooled & fit), np.flatnonzero(fooled & test)) for fit, test in rounds]
        #: every tested pair, in round order
        self.test = np.concatenate([test for _, test in self.rounds])
        #: the fewest fitting pairs any round has
        self.n_fit = min(len(fit) for fit, _ in self.rounds)
        self._pairs = np.flatnonzero(fooled)
        self._x_adv = arrays["x_adv"]

    @functools.cached_property
    def _inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cell's adversarial inputs (and noisy copies), read once for every detector."""
        x_adv = torch.from_numpy(self._x_adv[self._pairs])
        noisy = None
        if self.noisy:
            seed = derive_seed(self.seed, "noise", self.record.key)
            noisy = noisy_copies(self.clean_inputs[self._pairs], x_adv, seed)
        return x_adv, noisy

    def _rows(self, signatures: Signatures, detector: Detector, what: str) -> np.ndarray:
        key = (detector.signature_key(), f"{what}:{self.record.key}")
        if key not in signatures.store:
            x_adv, noisy = self._inputs
            signatures.get(detector, f"adversarial:{self.record.key}", x_adv)
            if noisy is not None:
                signatures.get(detector, f"noisy:{self.record.key}", noisy)
        full = np.full((len(self.clean_inputs),) + signatures.store[key].shape[1:], np.nan)
        full[self._pairs] = signatures.store[key]
        return full

    def adversarial(self, signatures: Signatures, detector: Detector, rows: np.ndarray) -> np.ndarray:
        return self._rows(signatures, detector, "adversarial")[rows]

    def negatives(self, signatures: Signatures, detector: Detector, rows: np.ndarray) -> np.ndarray:
        clean = signatures.store[(detector.signature_key(), "clean")][rows]
        return np.concatenate([clean, self._rows(signatures, detector, "noisy")[rows]]) if self.noisy else clean

    def n_negatives(self, rows: np.ndarray) -> int:
        return len(rows) * (2 if self.noisy else 1)


def _too_few(record: AttackRecord, n_test: int, fit_record: AttackRecord, n_fit: int, supervised: bool) -> str | None:
    if record.n_fooled == 0:
        return f"the attack fooled none of the {record.n_attacked} correctly classified inputs"
    if supervised and fit_record.key != record.key and n_fit < MIN_FIT_PAIRS:
        return (f"too few adversarial examples to fit on {fit_record.key} ({n_fit} pairs, {MIN_FIT_PAIRS} needed); "
                f"raise --n, --fit-fraction or that cell's strength")
    if n_test < MIN_TEST_PAIRS or (supervised and n_fit < MIN_FIT_PAIRS):
        need = f"{MIN_FIT_PAIRS} to fit and {MIN_TEST_PAIRS} to test" if supervised else f"{MIN_TEST_PAIRS} to test"
        return (f"too few adversarial examples: the attack fooled {record.n_fooled} of {record.n_attacked} inputs "
                f"({n_fit if supervised else 0} pairs to fit, {n_test} to test); the detector needs at least {need} "
                f"(raise --n or the strength)")
    return None
