"""torch_scores of the baselines with model-space state (ODIN, Mahalanobis, KD+BU, LID): the
fitted score as a differentiable torch function equals score_samples(signatures(...)) and has a
usable input gradient (for an adaptive attacker, Bryniarski et al. 2022)."""

import numpy as np
import pytest
import torch
import torchattacks

from advdetect.detectors import get_detector


@pytest.fixture
def case(tiny_model):
    """The tiny CNN with a sharper, bias-free head, so that random inputs fall in two classes;
    reference, clean and FGSM inputs (40 of each, enough for fit_logistic's 5 folds)."""
    model = tiny_model
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.weight.mul_(10.0)
    g = torch.Generator().manual_seed(2)
    reference, clean = torch.rand(60, 1, 8, 8, generator=g), torch.rand(40, 1, 8, 8, generator=g)
    labels = model(reference).argmax(dim=1)
    assert len(labels.unique()) > 1
    adversarial = torchattacks.FGSM(model, eps=0.1)(clean, model(clean).argmax(dim=1)).detach()
    return model, reference, labels, clean, adversarial


def check(detector, model, clean, adversarial, *, nonzero=0.9):
    for x in (clean, adversarial):
        expected = detector.score_samples(detector.signatures(model, x))
        x = x.clone().requires_grad_(True)
        scores = detector.torch_scores(model, x)
        assert scores.shape == (len(x),)
        np.testing.assert_allclose(scores.detach().numpy(), expected, rtol=1e-4, atol=1e-6)
        scores.sum().backward()
        grad = x.grad.flatten(1)
        assert torch.isfinite(grad).all()
        assert (grad.abs().sum(dim=1) > 0).float().mean() >= nonzero
    assert not model.training


def fitted(name, case, adversarial=True, **params):
    model, reference, labels, clean, adv = case
    detector = get_detector(name)(**params).prepare(model, reference, labels)
    detector.fit(detector.signatures(model, clean), detector.signatures(model, adv) if adversarial else None)
    return detector


@pytest.mark.slow
@pytest.mark.parametrize("setting", [(1000.0, 0.0014), (1.0, 0.0014), (1.0, 0.0)])
def test_odin(case, setting):
    model, _, _, clean, adversarial = case
    detector = fitted("odin", case, temperatures=(1.0, 1000.0), epsilons=(0.0, 0.0014))
    # each column as if fit had chosen it (on this data it picks T = 1000, epsilon = 0.0014)
    detector.column_ = detector._grid().index(setting)
    detector.temperature_, detector.epsilon_ = setting
    assert detector.gradient_kind == "bpda"
    check(detector, model, clean, adversarial)


def test_odin_preprocessing_moves_the_input(case):
    """The fitted epsilon is applied: a large one changes the torch score, as it does the signature."""
    model, _, _, clean, _ = case
    detector = fitted("odin", case, adversarial=False)  # the paper's T = 1000, epsilon = 0.0014
    plain = -torch.softmax(model(clean).double() / 1000.0, dim=1).max(dim=1).values
    assert not torch.allclose(detector.torch_scores(model, clean), plain, rtol=1e-7, atol=0)


@pytest.mark.parametrize("noises", [(0.005,), (0.0, 0.002)])
def test_mahalanobis(case, noises):
    model, _, _, clean, adversarial = case
    detector = fitted("mahalanobis", case, noises=noises)
    assert detector.gradient_kind == "bpda" and detector.pipeline_ is not None
    check(detector, model, clean, adversarial)


def test_mahalanobis_clean_only(case):
    model, _, _, clean, adversarial = case
    detector = fitted("mahalanobis", case, adversarial=False)
    assert detector.pipeline_ is None
    check(detector, model, clean, adversarial)


def test_kd_bu(case):
    model, _, _, clean, adversarial = case
    detector = fitted("kd_bu", case, dropout_samples=20)
    assert detector.gradient_kind == "eot"
    check(detector, model, clean, adversarial)


def test_lid(case):
    model, _, _, clean, adversarial = case
    detector = fitted("lid", case, ks=(5, 10))
    assert detector.gradient_kind == "exact"
    check(detector, model, clean, adversarial)
    # neighbours come from the fixed reference pool, so one input's score does not depend on its
    # batch (up to float32 rounding in the distances, ~1e-5 here)
    single = torch.cat([detector.torch_scores(model, clean[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(single.detach().numpy(), detector.torch_scores(model, clean[:5]).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kd_bu", "lid"])
def test_gradient_matches_finite_differences(case, name):
    """For the exact/eot kinds the gradient is that of the score itself: a central difference
    along the gradient's direction agrees with the directional derivative."""
    model, _, _, clean, _ = case
    detector = fitted(name, case)
    x = clean[:8].clone().requires_grad_(True)
    detector.torch_scores(model, x).sum().backward()
    direction = x.grad / x.grad.norm()
    step = 1e-3
    with torch.no_grad():
        difference = (detector.torch_scores(model, clean[:8] + step * direction).sum()
                      - detector.torch_scores(model, clean[:8] - step * direction).sum()) / (2 * step)
    assert float(difference) == pytest.approx(float(x.grad.norm()), rel=0.05)
