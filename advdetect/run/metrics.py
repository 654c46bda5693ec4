"""Detection metrics, adversarial (or out-of-distribution) inputs as the positive class.

Scores follow one convention everywhere: higher means more likely adversarial.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

METRIC_NAMES = ("auroc", "aupr_in", "aupr_out", "fpr_at_95tpr", "tnr_at_95tpr", "detection_accuracy", "tpr_at_5fpr")
#: The false-positive rate at which ``tpr_at_5fpr`` and the adaptive protocol's threshold are set.
FPR_BUDGET = 0.05


def detection_metrics(clean_scores: np.ndarray, adversarial_scores: np.ndarray) -> dict[str, float]:
    """AUROC; AUPR-in (clean as positive, scores negated); AUPR-out (adversarial as positive);
    FPR at 95% TPR (the smallest false-positive rate at which at least 95% of adversarial inputs
    are flagged); TNR at 95% TPR (one minus it: the share of clean inputs passed at that
    threshold); detection accuracy (the best balanced accuracy over thresholds,
    max 0.5 * (TPR + 1 - FPR), as in Liang et al. 2018 and Lee et al. 2018)."""
    clean_scores = np.asarray(clean_scores, dtype=np.float64).ravel()
    adversarial_scores = np.asarray(adversarial_scores, dtype=np.float64).ravel()
    if len(clean_scores) == 0 or len(adversarial_scores) == 0:
        raise ValueError("detection metrics need at least one clean and one adversarial score")
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(adversarial_scores))]
    scores = np.r_[clean_scores, adversarial_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr_at_95tpr = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr_in": min(1.0, float(average_precision_score(1 - labels, -scores))),  # rounding can pass 1
        "aupr_out": min(1.0, float(average_precision_score(labels, scores))),
        "fpr_at_95tpr": fpr_at_95tpr,
        "tnr_at_95tpr": 1.0 - fpr_at_95tpr,
        "detection_accuracy": float(np.max(0.5 * (tpr + 1.0 - fpr))),
        "tpr_at_5fpr": float(tpr[np.searchsorted(fpr, FPR_BUDGET, side="right") - 1]),
    }


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float = FPR_BUDGET) -> float:
    """The lowest threshold that flags (score >= threshold) at most ``fpr`` of ``clean_scores``."""
    ordered = np.sort(np.asarray(clean_scores, dtype=np.float64).ravel())[::-1]
    allowed = int(np.floor(fpr * len(ordered)))  # this many clean inputs may be flagged
    if allowed >= len(ordered):
        return -np.inf
    return float(np.nextafter(ordered[allowed], np.inf))


def bootstrap_auroc_ci(clean_scores: np.ndarray, adversarial_scores: np.ndarray, *, seed: int = 0,
                       resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling clean and adversarial scores
    separately. AUROC is the mean of the pairwise comparison matrix, so each resample is a
    weighted mean of it: two matrix products for all resamples. They run on whole numbers (how
    often each score was drawn, twice the comparison), so they are exact in float64 up to 2**53,
    and each resample's AUROC is rounded once, in the final division."""
    clean = np.asarray(clean_scores, dtype=np.float64).ravel()
    adversarial = np.asarray(adversarial_scores, dtype=np.float64).ravel()
    twice_wins = 2.0 * (adversarial[:, None] > clean[None, :]) + (adversarial[:, None] == clean[None, :])
    rng = np.random.default_rng(seed)

    def draw_counts(n: int) -> np.ndarray:
        picks = rng.integers(0, n, size=(resamples, n))  # one bincount for all: row b counts in [b*n, (b+1)*n)
        counts = np.bincount((picks + n * np.arange(resamples)[:, None]).ravel(), minlength=resamples * n)
        return counts.reshape(resamples, n).astype(np.float64)

    adversarial_counts = draw_counts(len(adversarial))
    clean_counts = draw_counts(len(clean))
    aurocs = ((adversarial_counts @ twice_wins) * clean_counts).sum(axis=1) / (2.0 * len(adversarial) * len(clean))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(aurocs, [tail, 100 - tail])
    return float(low), float(high)
