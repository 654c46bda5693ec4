import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from advdetect.detectors import DETECTORS, get_detector
from advdetect.errors import UsageError
from advdetect.signatures.features import confounding_gradient_features
from advdetect.run.metrics import detection_metrics


def test_registry_holds_the_detectors_and_rejects_unknown_names():
    assert {"confounding_gradient", "msp"} <= set(DETECTORS)
    with pytest.raises(UsageError, match="unknown detector 'nope'; valid detectors: .*confounding_gradient"):
        get_detector("nope")


def test_confounding_gradient_ranks_a_separable_case():
    rng = np.random.default_rng(0)
    # adversarial inputs have larger gradient norms in two of six tensors, on a log scale
    clean = np.exp(rng.normal(0, 1, (40, 6)))
    adversarial = np.exp(rng.normal(0, 1, (40, 6)) + np.array([0, 3, 0, 0, 3, 0]))
    detector = get_detector("confounding_gradient")().fit(clean[:20], adversarial[:20])
    metrics = detection_metrics(detector.score_samples(clean[20:]), detector.score_samples(adversarial[20:]))
    assert metrics["auroc"] > 0.97
    assert detector.fitted_params()["C"] in detector.Cs


def test_confounding_gradient_must_be_fitted_first_and_needs_two_pairs():
    detector = get_detector("confounding_gradient")()
    with pytest.raises(NotFittedError):
        detector.score_samples(np.ones((2, 3)))
    with pytest.raises(ValueError, match="at least 2 clean and 2 adversarial"):
        detector.fit(np.ones((1, 3)), np.ones((1, 3)))


def test_confounding_gradient_signatures_are_the_public_features(tiny_model, tiny_inputs):
    signatures = get_detector("confounding_gradient")().signatures(tiny_model, tiny_inputs)
    np.testing.assert_array_equal(signatures, confounding_gradient_features(tiny_model, tiny_inputs).numpy())


def test_msp_scores_low_confidence_as_suspect(tiny_model, tiny_inputs):
    detector = get_detector("msp")()
    signatures = detector.signatures(tiny_model, tiny_inputs)
    expected = torch.softmax(tiny_model(tiny_inputs).double(), 1).max(1).values.detach().numpy()
    np.testing.assert_allclose(signatures[:, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(detector.fit(signatures, signatures).score_samples(signatures), -expected, rtol=1e-6)


@pytest.mark.parametrize("n_clean, n_adv, log", [(60, 60, False), (60, 60, True), (50, 35, False)])
def test_fit_logistic_is_the_grid_search_it_replaces(n_clean, n_adv, log):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    from advdetect.detectors.base import DEFAULT_CS, fit_logistic

    rng = np.random.default_rng(n_clean + n_adv + log)
    clean = rng.lognormal(size=(n_clean, 6))
    adversarial = rng.lognormal(mean=0.3, size=(n_adv, 6))
    prefix = [FunctionTransformer(np.log)] if log else []
    pipeline, C, score = fit_logistic(clean, adversarial, prefix=prefix)

    features = np.concatenate([clean, adversarial])
    labels = np.r_[np.zeros(n_clean), np.ones(n_adv)]
    groups = np.r_[np.arange(n_clean), np.arange(n_adv) + (0 if n_clean == n_adv else n_clean)]
    search = GridSearchCV(make_pipeline(*prefix, StandardScaler(), LogisticRegression(max_iter=5000)),
                          {"logisticregression__C": list(DEFAULT_CS)}, cv=GroupKFold(5), scoring="roc_auc")
    search.fit(features, labels, groups=groups)
    assert C == search.best_params_["logisticregression__C"]
    assert score == pytest.approx(search.best_score_, abs=1e-9)
    probe = rng.lognormal(size=(20, 6))
    np.testing.assert_allclose(pipeline.decision_function(probe), search.best_estimator_.decision_function(probe),
                               rtol=1e-6, atol=1e-8)


def test_rank_auroc_is_roc_auc_score_with_ties():
    from sklearn.metrics import roc_auc_score

    from advdetect.detectors.base import rank_auroc

    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, 30)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, 30).astype(float)  # many ties
        assert rank_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def _boundary_model() -> torch.nn.Module:
    """Two classes split at x[0] = 0.5 (logits 40 * (x0 - 0.5) and its negative)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[20.0, 0, 0, 0], [-20.0, 0, 0, 0]]))
        model[1].bias.copy_(torch.tensor([-10.0, 10.0]))
    return model.eval()


def test_the_sensitive_variant_joins_instability_to_the_confounding_signature():
    from advdetect.signatures.features import prediction_instability

    model, inputs = _boundary_model(), torch.rand(6, 1, 2, 2)
    detector = get_detector("confounding_gradient")(loss="softmax_bce", noise_levels=[0.02, 0.08], noise_draws=4)
    signatures = detector.signatures(model, inputs)
    gradients = confounding_gradient_features(model, inputs, loss="softmax_bce").numpy()
    np.testing.assert_array_equal(signatures[:, :2], gradients)
    np.testing.assert_array_equal(signatures[:, 2:], prediction_instability(model, inputs, [0.02, 0.08], 4).numpy())
    assert detector.signature_key() != get_detector("confounding_gradient")(loss="softmax_bce").signature_key()


def test_an_audit_computes_a_block_two_variants_share_once(monkeypatch):
    """The softmax variant's gradient norms are the sensitive variant's first columns: one computation."""
    from advdetect.signatures import features
    from advdetect.stages.detect import Signatures

    calls = []
    computed = features.confounding_gradient_features
    monkeypatch.setattr("advdetect.detectors.confounding_gradient.confounding_gradient_features",
                        lambda *args, **kwargs: calls.append(kwargs["loss"]) or computed(*args, **kwargs))
    model, inputs = _boundary_model(), torch.rand(6, 1, 2, 2)
    softmax = get_detector("confounding_gradient")(loss="softmax_bce")
    sensitive = get_detector("confounding_gradient")(loss="softmax_bce", noise_levels=[0.02], noise_draws=4)
    paper = get_detector("confounding_gradient")()
    store = Signatures(model, batch_size=6)
    shared = [store.get(detector, "clean", inputs) for detector in (softmax, sensitive, paper)]
    assert calls == ["softmax_bce", "sigmoid_bce"]
    expected = [detector.signatures(model, inputs) for detector in (softmax, sensitive, paper)]
    for got, want in zip(shared, expected):
        np.testing.assert_array_equal(got, want)
    assert shared[1].shape[1] == shared[0].shape[1] + 2
    store.get(sensitive, "adversarial", inputs + 0.1)  # another input set is another computation
    assert calls[2:] == ["softmax_bce", "softmax_bce", "sigmoid_bce", "softmax_bce"]


def test_the_sensitive_variant_ranks_inputs_next_to_the_boundary_as_adversarial():
    # clean inputs sit far from the boundary, adversarial ones just across it (as minimum-norm attacks leave them)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(80, 1, 2, 2, generator=generator)
    clean[:, 0, 0, 0] = torch.where(torch.arange(80) % 2 == 0, 0.05, 0.95) + 0.05 * torch.rand(80, generator=generator)
    adversarial = clean.clone()
    adversarial[:, 0, 0, 0] = 0.5 + torch.where(clean[:, 0, 0, 0] < 0.5, 0.004, -0.004)
    model = _boundary_model()
    detector = get_detector("confounding_gradient")(loss="softmax_bce", noise_levels=[0.01, 0.04], noise_draws=8)
    clean_sig, adv_sig = detector.signatures(model, clean), detector.signatures(model, adversarial)
    detector.fit(clean_sig[:40], adv_sig[:40])
    auroc = detection_metrics(detector.score_samples(clean_sig[40:]), detector.score_samples(adv_sig[40:]))["auroc"]
    assert auroc > 0.95


def test_the_agnostic_detector_makes_its_own_adversarial_examples():
    from advdetect.detectors.confounding_gradient_agnostic import boundary_step, sign_gradient_step

    model = _boundary_model()
    x = torch.tensor([[0.2, 0.3, 0.4, 0.9], [0.8, 0.1, 0.5, 0.5]]).view(2, 1, 2, 2)
    # FGSM: only the first pixel moves the logits; it moves toward the boundary, by epsilon
    moved = sign_gradient_step(model, x, torch.tensor([1, 0]), 0.1)
    torch.testing.assert_close(moved.flatten(1)[:, 0], torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(moved.flatten(1)[:, 1:], x.flatten(1)[:, 1:])
    # BIM's iteration: steps of 2.5 * eps / steps, projected back into the eps ball
    iterated = sign_gradient_step(model, x, torch.tensor([1, 0]), 0.1, steps=3)
    torch.testing.assert_close(iterated.flatten(1)[:, 0], torch.tensor([0.3, 0.7]))
    # on a linear model one linearized step lands (1 + overshoot) times as far as the boundary at 0.5
    crossed = boundary_step(model, x, overshoot=0.2, steps=5)
    torch.testing.assert_close(crossed.flatten(1)[:, 0], torch.tensor([0.5 + 0.2 * 0.3, 0.5 - 0.2 * 0.3]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(crossed.flatten(1)[:, 1:], x.flatten(1)[:, 1:])


def test_the_agnostic_detector_fits_without_the_audited_attack_and_ranks_a_boundary_case():
    generator = torch.Generator().manual_seed(1)
    reference = torch.rand(60, 1, 2, 2, generator=generator)
    reference[:, 0, 0, 0] = (torch.where(torch.arange(60) % 2 == 0, 0.05, 0.95)
                             + 0.05 * torch.rand(60, generator=generator))
    labels = (reference[:, 0, 0, 0] < 0.5).long()  # class 1 below the boundary
    model = _boundary_model()
    detector = get_detector("confounding_gradient_agnostic")(noise_levels=[0.02, 0.08], epsilons=[0.6], noise_draws=8)
    assert not detector.needs_adversarial and not detector.uses_adversarial  # reported under seen and oneclass
    detector.prepare(model, reference, labels)
    assert detector.fitted_params()["n_self_made"] == 120  # every FGSM and every boundary step crossed
    # the audited "attack": inputs just across the boundary, none of which the detector saw
    clean = torch.rand(40, 1, 2, 2, generator=generator)
    clean[:, 0, 0, 0] = torch.where(torch.arange(40) % 2 == 0, 0.1, 0.9)
    adversarial = clean.clone()
    adversarial[:, 0, 0, 0] = 0.5 + torch.where(clean[:, 0, 0, 0] < 0.5, 0.003, -0.003)
    detector.fit(detector.signatures(model, clean))
    scores = [detector.score_samples(detector.signatures(model, x)) for x in (clean, adversarial)]
    assert detection_metrics(*scores)["auroc"] > 0.95


def test_a_detector_implements_fit_signatures_not_fit():
    """``fit`` is the entry point on inputs (and forwards signatures): an audit calls ``fit_signatures``,
    so a detector that overrode ``fit`` would never be fitted in one."""
    from advdetect.detectors import Detector

    with pytest.raises(TypeError, match="Old overrides fit: a detector implements fit_signatures"):
        class Old(Detector):
            def fit(self, clean, adversarial=None):
                return self
