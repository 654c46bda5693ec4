"""Stage 3, adaptive: every detector against an attacker who knows it (the suite's ``[adaptive]`` table).

A detection number measured on attacks that ignore the detector is an upper bound, not an
evaluation: Carlini and Wagner, "Adversarial Examples Are Not Easily Detected" (AISec 2017);
Tramer, Carlini, Brendel and Madry, "On Adaptive Attacks to Adversarial Example Defenses"
(NeurIPS 2020); Bryniarski et al., "Evading Adversarial Example Detection Defenses with
Orthogonal Projected Gradient Descent" (ICLR 2022). For each detector this stage:

1. fits it as the detect stage's ``seen`` protocol does on the comparison cell (the suite's PGD at
   the adaptive budget): prepared on the reference inputs, fitted on that cell's calibration
   pairs (or the reference inputs, for a detector that uses no adversarial examples). It refits
   from the run folder, so it needs nothing of the detect stage but its files' inputs;
2. sets the threshold that flags 5% of the clean calibration inputs;
3. attacks the test inputs with Orthogonal PGD (:mod:`advdetect.attacks.orthogonal_pgd`) through
   the detector's differentiable score (:meth:`~advdetect.detectors.Detector.torch_scores`),
   starting from the oblivious attack's example where that fooled the model (so the adaptive
   attacker is never weaker than the oblivious one) and from a random point elsewhere;
4. scores what the attack returns with the detector's own scores (``score_samples`` of
   ``signatures``, never the differentiable stand-in), so an attack counts only by what the
   deployed detector would say.

Each row (protocol ``adaptive``) holds the undetected success rate (fooled and not flagged, over
the attacked inputs), TPR at 5% FPR and AUROC, with the oblivious PGD's numbers on the same test
inputs at the same threshold beside them. With ``--fit-folds`` the first fold's split is used.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advdetect.attacks.orthogonal_pgd import OrthogonalPGD
from advdetect.detectors import Detector, build_detector, suite_variants
from advdetect.stages.distributed import current_world
from advdetect.run.metrics import FPR_BUDGET, detection_metrics, threshold_at_fpr
from advdetect.progress import Progress, no_progress, progress
from advdetect.run.records import ADAPTIVE, AttackRecord, ResultRow, derive_seed
from advdetect.run.folder import (COMPLETE, RUNNING, cell_arrays, computed_from, read_run, record_files,
                                  reference_arrays, sample_arrays, set_stage, update_run)
from advdetect.run.splits import fit_rounds
from advdetect.run.storage import save_arrays, write_json

log = logging.getLogger(__name__)

ADAPTIVE_JSON = "adaptive.json"
#: The attack name of adaptive rows and of their cell key, ``adaptive[eps=0.1]``.
ADAPTIVE_ATTACK = "adaptive"


def adaptive_stage(run_dir: Path, model: nn.Module, records: list[AttackRecord],
                   on_progress: Progress = no_progress) -> list[ResultRow]:
    """The suite's adaptive protocol: ``adaptive.json`` and ``scores/adaptive.npz``; nothing when the
    suite has no ``[adaptive]`` table."""
    info = read_run(run_dir)
    document = info.suite.get("document", {})
    spec = document.get("adaptive")
    if not spec or not current_world().is_main:
        return []
    set_stage(run_dir, ADAPTIVE, RUNNING)
    started = time.perf_counter()
    source = next(r for r in records if r.attack == spec["attack"] and r.strength == spec["eps"])
    sample = sample_arrays(run_dir)
    image_shape = sample["x"].shape[1:]
    correct = np.flatnonzero(sample["pred"] == sample["y"])
    x, y = torch.from_numpy(sample["x"][correct]), torch.from_numpy(sample["y"][correct])
    reference = reference_arrays(run_dir, image_shape)
    oblivious = cell_arrays(run_dir, source, len(correct), image_shape)
    fit, test = fit_rounds(info, len(correct))[0]
    test_rows = np.flatnonzero(test)
    if spec.get("max_inputs") is not None:
        test_rows = test_rows[: spec["max_inputs"]]
    names = spec["detectors"] or info.detectors
    variants = suite_variants(document)
    device = next(model.parameters()).device
    rows, scores, seconds = [], {}, {}
    for done, name in enumerate(progress(names, desc="adaptive", unit="detector")):
        on_progress(ADAPTIVE, name, done, len(names))
        detector_started = time.perf_counter()
        detector = build_detector(name, variants)
        fitted = fit_as_seen(detector, model, x, fit, oblivious, reference, info.batch_size)
        threshold = threshold_at_fpr(fitted.calibration_scores)
        attack = OrthogonalPGD(model, eps=spec["eps"], alpha=spec["alpha"], steps=spec["steps"], norm=spec["norm"],
                               method=spec["method"], lam=spec["lam"], threshold=threshold,
                               score=lambda inputs: detector.torch_scores(model, inputs))
        adversarial = run_attack(attack, x[test_rows], y[test_rows], torch.from_numpy(oblivious["x_adv"][test_rows]),
                                 torch.from_numpy(oblivious["fooled"][test_rows]), info.batch_size, device,
                                 derive_seed(info.seed, ADAPTIVE, name))
        row, row_scores = measure(name, spec, fitted, model, x[test_rows], y[test_rows], adversarial,
                                  torch.from_numpy(oblivious["x_adv"][test_rows]), oblivious["fooled"][test_rows],
                                  threshold, info.batch_size)
        row.n_fit = fitted.n_fit
        row.detector_params = {**fitted.params, "threshold": threshold, "gradient": detector.gradient_kind,
                               "method": spec["method"], "steps": spec["steps"]}
        rows.append(row)
        scores.update({f"{name}__{k}": v for k, v in row_scores.items()})
        seconds[name] = round(time.perf_counter() - detector_started, 3)
        if row.tpr_at_5fpr is not None and row.tpr_at_5fpr < 0.1:
            log.warning("%s collapses against an attacker who knows it: it flags %.0f%% of the adaptive adversarial "
                        "examples at 5%% false positives", name, 100 * row.tpr_at_5fpr)
    save_arrays(run_dir / "scores" / "adaptive.npz", **scores)
    write_json(run_dir / ADAPTIVE_JSON, [row.to_dict() for row in rows])
    record_files(run_dir, {name: computed_from(records) for name in (ADAPTIVE_JSON, "scores/adaptive.npz")})
    update_run(run_dir, (ADAPTIVE, time.perf_counter() - started), adaptive_timings=seconds)
    set_stage(run_dir, ADAPTIVE, COMPLETE)
    return rows


class Fitted:
    """A detector fitted as under ``seen``, and its own (non-differentiable) scores."""

    def __init__(self, detector: Detector, model: nn.Module, batch_size: int, n_fit: int,
                 calibration: np.ndarray) -> None:
        self.detector, self.model, self.batch_size, self.n_fit = detector, model, batch_size, n_fit
        self.params = detector.fitted_params()
        #: scores of the clean calibration inputs, which set the threshold
        self.calibration_scores = detector.score_samples(calibration)

    def scores(self, inputs: torch.Tensor) -> np.ndarray:
        if not len(inputs):
            return np.zeros(0)
        return self.detector.score_samples(self.detector.signatures(self.model, inputs, batch_size=self.batch_size))


def fit_as_seen(detector: Detector, model: nn.Module, x: torch.Tensor, fit: np.ndarray,
                oblivious: dict[str, np.ndarray], reference: dict[str, np.ndarray], batch_size: int) -> Fitted:
    """Prepare on the reference inputs; fit on the comparison cell's calibration pairs when the
    detector uses adversarial examples, else on the reference inputs (as the detect stage does)."""
    reference_x = torch.from_numpy(reference["x"])
    detector.prepare(model, reference_x, torch.from_numpy(reference["y"]), batch_size=batch_size)
    rows = np.flatnonzero(fit)
    calibration = detector.signatures(model, x[rows], batch_size=batch_size)  # once: the fit and the threshold
    if detector.uses_adversarial:
        paired = oblivious["fooled"][rows]
        detector.fit(calibration[paired], detector.signatures(model, torch.from_numpy(oblivious["x_adv"][rows[paired]]),
                                                              batch_size=batch_size))
        return Fitted(detector, model, batch_size, int(paired.sum()), calibration)
    detector.fit(detector.signatures(model, reference_x, batch_size=batch_size))
    return Fitted(detector, model, batch_size, 0, calibration)


def run_attack(attack: OrthogonalPGD, x: torch.Tensor, y: torch.Tensor, oblivious: torch.Tensor,
               oblivious_fooled: torch.Tensor, batch_size: int, device: torch.device, seed: int) -> torch.Tensor:
    """The attack on every input, in batches, each seeded by its position (global RNG left as it
    was); it starts from the oblivious attack's example where that fooled the model, so it is never
    weaker than the oblivious attack (see :class:`~advdetect.attacks.orthogonal_pgd.OrthogonalPGD`)."""
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, start in enumerate(range(0, len(x), batch_size)):
            torch.manual_seed(derive_seed(seed, "chunk", index))
            rows = slice(start, start + batch_size)
            out.append(attack(x[rows].to(device), y[rows].to(device), start=oblivious[rows],
                              use_start=oblivious_fooled[rows]).detach().cpu().float())
    return torch.cat(out) if out else x.clone()


def measure(name: str, spec: dict, fitted: Fitted, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            adaptive: torch.Tensor, oblivious: torch.Tensor, oblivious_fooled: np.ndarray, threshold: float,
            batch_size: int) -> tuple[ResultRow, dict[str, np.ndarray]]:
    """The adaptive row of one detector, the oblivious attack's numbers beside it, and the scores."""
    with torch.no_grad():
        device = next(model.parameters()).device
        predicted = torch.cat([model(adaptive[i : i + batch_size].to(device)).argmax(1).cpu()
                               for i in range(0, len(adaptive), batch_size)]) if len(adaptive) else y
    fooled = (predicted != y).numpy()
    clean_scores = fitted.scores(x)
    adaptive_scores = fitted.scores(adaptive[fooled])
    oblivious_scores = fitted.scores(oblivious[oblivious_fooled])
    row = ResultRow(attack=ADAPTIVE_ATTACK, strength_name="eps", strength=spec["eps"], detector=name,
                    protocol=ADAPTIVE, n_clean=len(x), n_adv=int(fooled.sum()), n_fit=0,
                    attack_success_rate=float(fooled.mean()) if len(x) else None)
    row.undetected_success_rate, row.tpr_at_5fpr, row.auroc = evasion(clean_scores, adaptive_scores, threshold, len(x))
    (row.oblivious_undetected_success_rate, row.oblivious_tpr_at_5fpr,
     row.oblivious_auroc) = evasion(clean_scores, oblivious_scores, threshold, len(x))
    row.oblivious_attack_success_rate = float(oblivious_fooled.mean()) if len(x) else None
    if row.auroc is not None:
        metrics = detection_metrics(clean_scores, adaptive_scores)
        row.aupr_in, row.aupr_out, row.fpr_at_95tpr, row.tnr_at_95tpr, row.detection_accuracy = (
            metrics[k] for k in ("aupr_in", "aupr_out", "fpr_at_95tpr", "tnr_at_95tpr", "detection_accuracy"))
    else:
        row.reason = f"the adaptive attack fooled none of the {len(x)} test inputs" if len(x) else "no test input"
    return row, {"clean": clean_scores, "adversarial": adaptive_scores, "oblivious": oblivious_scores}


def evasion(clean_scores: np.ndarray, adversarial_scores: np.ndarray, threshold: float,
            n_attacked: int) -> tuple[float | None, float | None, float | None]:
    """(undetected success rate, TPR at the threshold, AUROC) of the fooled inputs' scores."""
    if not n_attacked:
        return None, None, None
    flagged = adversarial_scores >= threshold
    undetected = float((~flagged).sum() / n_attacked)
    if not len(adversarial_scores):
        return undetected, None, None
    return undetected, float(flagged.mean()), float(detection_metrics(clean_scores, adversarial_scores)["auroc"])


__all__ = ["ADAPTIVE_ATTACK", "ADAPTIVE_JSON", "FPR_BUDGET", "adaptive_stage"]
