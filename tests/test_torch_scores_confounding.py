"""Differentiable scores of the confounding-gradient detectors, for adaptive attacks: the gradient
norms of :func:`advdetect.signatures.features.confounding_gradient_torch` against the detached features, each
detector's ``torch_scores`` against ``score_samples(signatures(...))``, and the input gradient an
attacker gets from them."""

import numpy as np
import pytest
import torch
import torchattacks
from scipy.stats import spearmanr
from torch import nn

from advdetect.signatures import features as features_module
from advdetect.detectors.confounding_gradient import ConfoundingGradient
from advdetect.detectors.confounding_gradient_agnostic import ConfoundingGradientAgnostic, boundary_step
from advdetect.detectors.confounding_gradient_oneclass import ConfoundingGradientOneClass
from advdetect.signatures.features import (confounding_gradient_features, confounding_gradient_torch,
                                           per_sample_loop_features, prediction_instability)

# double backpropagation through the signatures of several architectures, in float64: seconds each
pytestmark = pytest.mark.slow


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual.detach() - expected).abs() / expected.abs().clamp_min(1e-300)).max())


@pytest.fixture
def data(tiny_model):
    """40 random clean inputs and their FGSM adversarial examples (against the model's own predictions)."""
    clean = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        predicted = tiny_model(clean).argmax(1)
    adversarial = torchattacks.FGSM(tiny_model, eps=0.1)(clean, predicted)
    return clean, adversarial


def fitted(detector, model, clean, adversarial):
    return detector.fit(detector.signatures(model, clean), detector.signatures(model, adversarial))


# --- the gradient norms ----------------------------------------------------------------------

@pytest.mark.parametrize("loss, label", [("sigmoid_bce", "ones"), ("softmax_bce", "ones"),
                                         ("sigmoid_bce", "not_predicted"), ("predicted_ce", "ones")])
def test_differentiable_norms_equal_the_features(tiny_model, data, loss, label):
    inputs = torch.cat(data).requires_grad_(True)
    actual = confounding_gradient_torch(tiny_model, inputs, label=label, loss=loss)
    assert actual.requires_grad and actual.dtype == torch.float64 and actual.shape == (80, 6)
    expected = confounding_gradient_features(tiny_model, inputs.detach(), label=label, loss=loss)
    assert relative_error(actual, expected) <= 1e-4


def test_differentiable_l1_norms_equal_the_loop(tiny_model, data):
    inputs = torch.cat([data[0][:10], data[1][:10]])
    actual = confounding_gradient_torch(tiny_model, inputs, norm="l1")
    assert actual.requires_grad  # through a copy of inputs that requires gradients
    assert relative_error(actual, per_sample_loop_features(tiny_model, inputs, norm="l1")) <= 1e-4


class PixelNet(nn.Module):
    """Every differentiable closed form: a first convolution on one input channel (unfolded), a
    convolution on a small output (pixel Gram), a grouped strided one (grouped convolutions),
    batch normalization, and a parameter used outside any supported layer (the per-input loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.head = nn.Linear(16 * 2 * 2, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = nn.functional.max_pool2d(h, 2)
        h = torch.tanh(self.bn(self.conv2(h))) * self.scale
        return self.head(torch.relu(self.conv3(h)).flatten(1))


@pytest.mark.parametrize("norm", ["l2sq", "l1"])
def test_every_path_and_its_gradient_in_float64(monkeypatch, norm):
    """Values against the per-input loop, gradients against finite differences (gradcheck), on a
    model that takes every path of the differentiable closed forms and the fallback."""
    torch.manual_seed(0)
    model = PixelNet().double().eval()
    used = dict.fromkeys(["_PixelGramNorms", "_ConvWeightNorms", "_UnfoldedConvWeightNorms", "_BatchNormNorms"], 0)
    for name in used:
        cls = getattr(features_module, name)

        def counting(*args, _apply=cls.apply, _name=name):
            used[_name] += 1
            return _apply(*args)
        monkeypatch.setattr(cls, "apply", counting)
    inputs = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    actual = confounding_gradient_torch(model, inputs, norm=norm)
    assert relative_error(actual, per_sample_loop_features(model, inputs, norm=norm)) <= 1e-8
    assert all(used[name] or (name == "_PixelGramNorms" and norm == "l1") for name in used), used  # L1: no Gram
    x = inputs[:2].clone().requires_grad_(True)
    # of the log norms, as the detectors use them: every column's gradient counts alike
    assert torch.autograd.gradcheck(lambda z: confounding_gradient_torch(model, z, norm=norm).log(), (x,),
                                    fast_mode=True)
    assert model.conv1.weight.grad is None and model.scale.grad is None


def test_gradient_of_the_norms_on_the_batchnorm_cnn_in_float64(tiny_model):
    model = tiny_model.double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: confounding_gradient_torch(model, z, loss="softmax_bce").log(), (x,),
                                    fast_mode=True)


def test_torch_norms_match_on_the_feature_tests_architectures():
    """Resnet blocks with in-place operations, grouped, depthwise, dilated and padded convolutions,
    Conv1d, tied weights, a weight used outside its layer, and token inputs (not differentiable)."""
    from test_features import architectures

    for name, (model, shape) in architectures().items():
        model = model.double().eval()
        generator = torch.Generator().manual_seed(1)
        inputs = (torch.randint(1, 11, (4, 9), generator=generator) if shape is None
                  else torch.rand(4, *shape, generator=generator, dtype=torch.float64))
        actual = confounding_gradient_torch(model, inputs)
        assert relative_error(actual, per_sample_loop_features(model, inputs)) <= 1e-8, name


# --- torch_scores ----------------------------------------------------------------------------

# C fixed at 1: on random inputs cross-validation may pick a C so small that the scores hardly
# depend on the signature, and a wrong feature would go unnoticed
EXACT = {
    "paper": lambda: ConfoundingGradient(Cs=(1.0,)),
    "softmax_bce": lambda: ConfoundingGradient(loss="softmax_bce", Cs=(1.0,)),
    "with_outputs": lambda: ConfoundingGradient(with_outputs=True, Cs=(1.0,)),
    "two_labels_layers": lambda: ConfoundingGradient(label="ones+not_predicted", layers=["conv.*", "head.*"],
                                                     Cs=(1.0,)),
    "oneclass": lambda: ConfoundingGradientOneClass(),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_torch_scores_equal_score_samples(tiny_model, data, name):
    clean, adversarial = data
    detector = fitted(EXACT[name](), tiny_model, clean, adversarial)
    assert detector.gradient_kind == "exact"
    for inputs in (clean, adversarial):
        expected = detector.score_samples(detector.signatures(tiny_model, inputs))
        actual = detector.torch_scores(tiny_model, inputs.clone().requires_grad_(True))
        assert actual.shape == (len(inputs),)
        assert expected.std() > 0.1  # the scores depend on the signature
        np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_l1_torch_scores_equal_score_samples(tiny_model, data):
    clean, adversarial = data[0][:16], data[1][:16]  # the detached L1 signature takes the per-input loop
    detector = fitted(ConfoundingGradient(norm="l1", Cs=(1.0,), cv=2), tiny_model, clean, adversarial)
    inputs = torch.cat([clean, adversarial])
    expected = detector.score_samples(detector.signatures(tiny_model, inputs))
    actual = detector.torch_scores(tiny_model, inputs).detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_agnostic_torch_scores_equal_score_samples_without_noise(tiny_model, data):
    clean, adversarial = data
    reference = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        labels = tiny_model(reference).argmax(1)
    detector = ConfoundingGradientAgnostic(noise_levels=(), boundary_steps=3).prepare(tiny_model, reference, labels)
    assert detector.gradient_kind == "exact"
    for inputs in (clean, adversarial):
        expected = detector.score_samples(detector.signatures(tiny_model, inputs))
        actual = detector.torch_scores(tiny_model, inputs).detach().numpy()
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_sensitive_variant_is_a_rank_close_surrogate(tiny_model, data):
    """The instability block counts argmax flips under noise, a step function: ``torch_scores``
    replaces the count by the softmax mass that leaves the clean prediction under the same noise
    draws (``gradient_kind`` ``surrogate``), so the scores are close in rank, not equal. Tested on
    the inputs the variant is for, just past the decision boundary (DeepFool-like steps), where
    the noise flips some predictions and not others."""
    clean = data[0]
    boundary = boundary_step(tiny_model, clean, overshoot=0.02, steps=10)
    levels = (0.02, 0.08)
    detector = fitted(ConfoundingGradient(loss="softmax_bce", noise_levels=levels, Cs=(1.0,)), tiny_model, clean,
                      boundary)
    assert detector.gradient_kind == "surrogate" and ConfoundingGradient.gradient_kind == "exact"
    flips = prediction_instability(tiny_model, boundary, levels, 8).numpy()[:, [0, 2]] * 9 - 0.5
    assert 0 < flips.mean() < 8 and flips.std() > 1, "the noise must flip some predictions, not all"
    inputs = torch.cat([clean, boundary])
    signatures = detector.signatures(tiny_model, inputs)
    expected = detector.score_samples(signatures)
    actual = detector.torch_scores(tiny_model, inputs).detach().numpy()
    assert spearmanr(actual, expected).statistic > 0.9
    assert spearmanr(actual[40:], expected[40:]).statistic > 0.9  # among the boundary inputs alone
    assert not np.allclose(actual, expected, rtol=1e-4)  # a surrogate, not equal
    # the surrogate moves the flip shares, nothing else: the gradient norms and KL columns are exact
    surrogate = detector.torch_signatures(tiny_model, inputs).detach().numpy()
    exact_columns = [*range(6), 7, 9]
    np.testing.assert_allclose(surrogate[:, exact_columns], signatures[:, exact_columns], rtol=1e-4)
    for column in (6, 8):  # the flip shares: the surrogate follows the count
        assert spearmanr(surrogate[:, column], signatures[:, column]).statistic > 0.5


def test_agnostic_default_is_a_rank_close_surrogate(tiny_model, data):
    """The agnostic detector's default signature has the instability block: a surrogate too."""
    clean = data[0]
    reference = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        labels = tiny_model(reference).argmax(1)
    detector = ConfoundingGradientAgnostic(boundary_steps=3).prepare(tiny_model, reference, labels)
    assert detector.gradient_kind == "surrogate"
    inputs = torch.cat([clean, boundary_step(tiny_model, clean, overshoot=0.02, steps=10), data[1]])
    expected = detector.score_samples(detector.signatures(tiny_model, inputs))
    assert spearmanr(detector.torch_scores(tiny_model, inputs).detach().numpy(), expected).statistic > 0.9


def test_gradient_kind_follows_the_parameters():
    assert ConfoundingGradientAgnostic.gradient_kind == "surrogate"
    assert ConfoundingGradientOneClass(noise_levels=(0.05,)).gradient_kind == "surrogate"
    detector = ConfoundingGradient()
    assert detector.set_params(noise_levels=(0.05,)).gradient_kind == "surrogate"
    assert detector.set_params(noise_levels=()).gradient_kind == "exact"


@pytest.mark.parametrize("name", ["paper", "softmax_bce", "with_outputs", "oneclass", "sensitive"])
def test_input_gradient_is_finite_and_nonzero(tiny_model, data, name):
    clean, adversarial = data
    make = EXACT.get(name, lambda: ConfoundingGradient(loss="softmax_bce", noise_levels=(0.1, 0.3)))
    detector = fitted(make(), tiny_model, clean, adversarial)
    inputs = torch.cat(data).requires_grad_(True)
    detector.torch_scores(tiny_model, inputs).sum().backward()
    gradient = inputs.grad.flatten(1)
    assert torch.isfinite(gradient).all()
    assert (gradient.abs().sum(1) > 0).float().mean() >= 0.9
    assert all(p.grad is None for p in tiny_model.parameters())  # nothing accumulated in the model
    assert not tiny_model.training and all(p.requires_grad for p in tiny_model.parameters())  # state restored


def test_score_gradient_lowers_the_score(tiny_model, data):
    """A small step against the input gradient of the paper's score lowers it for most inputs."""
    clean, adversarial = data
    detector = fitted(ConfoundingGradient(), tiny_model, clean, adversarial)
    inputs = adversarial.clone().requires_grad_(True)
    scores = detector.torch_scores(tiny_model, inputs)
    (gradient,) = torch.autograd.grad(scores.sum(), inputs)
    step = 1e-3 * gradient / gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    moved = detector.score_samples(detector.signatures(tiny_model, (inputs - step).detach()))
    assert (moved < scores.detach().numpy()).mean() >= 0.9
