"""How the correctly classified audited inputs split into the detectors' calibration and test
parts: one seeded split, read by the detect and adaptive stages alike (no torch)."""

from __future__ import annotations

import math

import numpy as np

from advdetect.run.records import RunInfo, derive_seed


def calibration_split(info: RunInfo, n: int) -> np.ndarray:
    """Which of the ``n`` correctly classified inputs calibrate the detectors (the rest test them)."""
    calibration = np.zeros(n, dtype=bool)
    order = np.random.default_rng(derive_seed(info.seed, "calibration")).permutation(n)
    calibration[order[: math.ceil(info.fit_fraction * n)]] = True
    return calibration


def fit_rounds(info: RunInfo, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, test) masks over the ``n`` correctly classified inputs: one round, the calibration
    split; or, with ``fit_folds`` K, one round per fold, which it tests and the others fit."""
    if not info.fit_folds:
        calibration = calibration_split(info, n)
        return [(calibration, ~calibration)]
    order = np.random.default_rng(derive_seed(info.seed, "folds")).permutation(n)
    fold = np.empty(n, dtype=int)
    fold[order] = np.arange(n) % info.fit_folds
    return [(fold != k, fold == k) for k in range(info.fit_folds)]
