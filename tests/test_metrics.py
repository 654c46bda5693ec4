import numpy as np
import pytest

from advdetect.run.metrics import detection_metrics


def test_hand_computed_case():
    # clean scores 0.1, 0.4; adversarial 0.35, 0.8. Of the 4 clean/adversarial pairs, 3 are ordered right.
    m = detection_metrics(np.array([0.1, 0.4]), np.array([0.35, 0.8]))
    assert m["auroc"] == pytest.approx(0.75)
    # adversarial positive, ranked 0.8 (adv), 0.4 (clean), 0.35 (adv): AP = (1 + 2/3) / 2
    assert m["aupr_out"] == pytest.approx(5 / 6)
    # clean positive on negated scores, ranked 0.1 (clean), 0.35 (adv), 0.4 (clean): AP = (1 + 2/3) / 2
    assert m["aupr_in"] == pytest.approx(5 / 6)
    # flagging every adversarial input needs the threshold at 0.35, which also flags the clean 0.4
    assert m["fpr_at_95tpr"] == pytest.approx(0.5)
    # best threshold: 0.8 (TPR 0.5, FPR 0) or 0.35 (TPR 1, FPR 0.5): balanced accuracy 0.75
    assert m["detection_accuracy"] == pytest.approx(0.75)


def test_perfect_and_inverted_detectors():
    perfect = detection_metrics(np.array([0.0, 0.1, 0.2]), np.array([0.5, 0.9]))
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr_at_95tpr": 0.0, "tnr_at_95tpr": 1.0,
                       "detection_accuracy": 1.0, "tpr_at_5fpr": 1.0}
    inverted = detection_metrics(np.array([0.5, 0.9]), np.array([0.0, 0.1, 0.2]))
    assert inverted["auroc"] == 0.0 and inverted["fpr_at_95tpr"] == 1.0 and inverted["detection_accuracy"] == 0.5
    assert inverted["tpr_at_5fpr"] == 0.0


def test_tpr_at_5fpr_and_its_threshold_flag_at_most_5_percent_of_clean_inputs():
    from advdetect.run.metrics import threshold_at_fpr

    clean = np.arange(100) / 100.0  # 0.00 .. 0.99: the top 5 (0.95 .. 0.99) may be flagged
    adversarial = np.r_[np.full(30, 0.97), np.full(70, 0.5)]
    assert detection_metrics(clean, adversarial)["tpr_at_5fpr"] == 0.3
    threshold = threshold_at_fpr(clean)
    assert (clean >= threshold).sum() == 5 and 0.94 < threshold <= 0.95
    assert (adversarial >= threshold).mean() == 0.3


def test_fpr_at_95tpr_takes_the_threshold_reaching_95_percent():
    clean = np.arange(100) / 100.0  # 0.00 .. 0.99
    adversarial = np.r_[np.full(95, 2.0), np.full(5, -1.0)]  # 95 above every clean score, 5 below
    assert detection_metrics(clean, adversarial)["fpr_at_95tpr"] == 0.0
    adversarial[94] = 0.895  # now the 95th adversarial input sits above 10 clean scores only
    assert detection_metrics(clean, adversarial)["fpr_at_95tpr"] == pytest.approx(0.10)


def test_bootstrap_interval_brackets_the_auroc_and_shrinks_with_more_data():
    from advdetect.run.metrics import bootstrap_auroc_ci

    rng = np.random.default_rng(0)
    small = rng.normal(0, 1, 30), rng.normal(1, 1, 30)
    large = rng.normal(0, 1, 600), rng.normal(1, 1, 600)
    for clean, adversarial in (small, large):
        low, high = bootstrap_auroc_ci(clean, adversarial, seed=1)
        assert low < detection_metrics(clean, adversarial)["auroc"] < high
    assert np.diff(bootstrap_auroc_ci(*large, seed=1)) < np.diff(bootstrap_auroc_ci(*small, seed=1)) / 2
    assert bootstrap_auroc_ci(*small, seed=1) == bootstrap_auroc_ci(*small, seed=1)  # seeded
    # the true AUROC of N(0,1) against N(1,1) is Phi(1 / sqrt 2) = 0.760; a 95% interval on 600 pairs covers it
    low, high = bootstrap_auroc_ci(*large, seed=1)
    assert low < 0.760 < high


def test_each_bootstrap_resample_is_the_auroc_of_the_drawn_scores():
    from advdetect.run.metrics import bootstrap_auroc_ci

    rng = np.random.default_rng(3)
    clean, adversarial = rng.normal(0, 1, 17).round(1), rng.normal(1, 1, 13).round(1)  # ties too
    draws = np.random.default_rng(5)  # the same draws as the function: adversarial first, then clean
    adversarial_picks = draws.integers(0, len(adversarial), size=(40, len(adversarial)))
    clean_picks = draws.integers(0, len(clean), size=(40, len(clean)))
    aurocs = [detection_metrics(clean[c], adversarial[a])["auroc"] for a, c in zip(adversarial_picks, clean_picks)]
    expected = np.clip(np.percentile(aurocs, [2.5, 97.5]), 0, 1)
    np.testing.assert_allclose(bootstrap_auroc_ci(clean, adversarial, seed=5, resamples=40), expected, rtol=1e-12)
