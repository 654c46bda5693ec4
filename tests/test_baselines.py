"""Every baseline detector: ranks an easy separable case correctly, and gives a hand-checked
value on a tiny model (numbers worked out on paper in the comments)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from advdetect.detectors import DETECTORS, get_detector
from advdetect.detectors.kd_bu import log_kernel_density
from advdetect.detectors.lid import lid_mle
from advdetect.run.metrics import detection_metrics

BASELINES = ("msp", "odin", "energy", "mahalanobis", "lid", "kd_bu", "gradnorm")


def identity_model(width: int = 2) -> nn.Sequential:
    """Logits = ReLU(x) for x in [0, 1]^width: hidden features and logits are the input itself."""
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.eye(width))
            layer.bias.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def separable():
    """Clean inputs sit near the two class corners (1, 0) and (0, 1), where a sharp model is
    confident; "adversarial" inputs sit near the middle, between the classes."""
    model = identity_model()
    with torch.no_grad():
        model[2].weight.mul_(10.0)
    g = torch.Generator().manual_seed(0)

    def corners(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 2
        noise = 0.05 * torch.randn(n, 2, generator=g)
        return (torch.nn.functional.one_hot(labels, 2).float() * 0.8 + 0.1 + noise).clamp(0, 1), labels

    reference, labels = corners(60)
    clean, _ = corners(40)
    adversarial = (0.5 + 0.05 * torch.randn(40, 2, generator=g)).clamp(0, 1)
    return model, reference, labels, clean, adversarial


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_is_registered_and_cites_its_paper(name):
    doc = DETECTORS[name].__module__
    module_doc = __import__(doc, fromlist=["_"]).__doc__
    assert module_doc and any(str(year) in module_doc for year in range(2016, 2023)), name


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_ranks_a_separable_case(name, separable):
    model, reference, labels, clean, adversarial = separable
    detector = get_detector(name)()
    detector.prepare(model, reference, labels)
    sig_clean, sig_adv = detector.signatures(model, clean), detector.signatures(model, adversarial)
    if detector.needs_adversarial:
        detector.fit(sig_clean[:20], sig_adv[:20])
    else:
        detector.fit(detector.signatures(model, reference))
    auroc = detection_metrics(detector.score_samples(sig_clean[20:]), detector.score_samples(sig_adv[20:]))["auroc"]
    assert auroc > 0.95, (name, auroc)


X = torch.tensor([[0.5, 0.2]])  # logits [0.5, 0.2] through identity_model
P0 = 1 / (1 + math.exp(-0.3))   # softmax([0.5, 0.2])[0] = 0.574443


def test_msp_value():
    signature = get_detector("msp")().signatures(identity_model(), X)
    assert signature[0, 0] == pytest.approx(P0, abs=1e-6)


def test_energy_value():
    # E = -log(e^0.5 + e^0.2) = -log(1.648721 + 1.221403) = -log(2.870124) = -1.054355
    signature = get_detector("energy")().signatures(identity_model(), X)
    assert signature[0, 0] == pytest.approx(-1.054355, abs=1e-6)


def test_gradnorm_value_matches_its_closed_form_and_autograd():
    # |p - 1/2|_1 = 2 * (0.574443 - 0.5) = 0.148885; |h|_1 = 0.7; GradNorm = 0.104220
    model = identity_model()
    signature = get_detector("gradnorm")().signatures(model, X)
    assert signature[0, 0] == pytest.approx(0.104220, abs=1e-6)
    logits = model(X)
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits, 1), torch.full_like(logits, 0.5), reduction="sum")
    (grad,) = torch.autograd.grad(kl, model[2].weight)
    assert grad.abs().sum().item() == pytest.approx(signature[0, 0], rel=1e-5)


def test_odin_value():
    # T = 1, epsilon = 0.1: d CE(class 0) / dx = p - e0 = [-0.426, +0.426], so x moves by
    # -0.1 * sign = [+0.1, -0.1] to [0.6, 0.1]; MSP there = 1 / (1 + e^-0.5) = 0.622459
    detector = get_detector("odin")(temperatures=(1.0, 1000.0), epsilons=(0.1, 0.0014))
    signature = detector.signatures(identity_model(), X)
    assert signature[0, 0] == pytest.approx(0.622459, abs=1e-6)
    detector.fit(signature)  # clean only: the paper's T = 1000, epsilon = 0.0014
    assert detector.fitted_params() == {"temperature": 1000.0, "epsilon": 0.0014}


def test_mahalanobis_value():
    # 1-D hidden feature h = x. Class 0 references at 0.1 and 0.3 (mean 0.2), class 1 at 0.7 and
    # 0.9 (mean 0.8); the shared variance is 0.01 (Ledoit-Wolf leaves one dimension alone), so
    # at x = 0.3 the distances are 1 and 25 and the confidence is -1, on both read layers.
    model = identity_model(1)
    detector = get_detector("mahalanobis")(noises=(0.0,))
    detector.prepare(model, torch.tensor([[0.1], [0.3], [0.7], [0.9]]), torch.tensor([0, 0, 1, 1]))
    np.testing.assert_allclose(detector.signatures(model, torch.tensor([[0.3]])), [[-1.0, -1.0]], atol=1e-5)
    # with noise 0.1 the input moves towards the closest mean, to 0.2: confidence 0
    detector = get_detector("mahalanobis")(noises=(0.1,))
    detector.prepare(model, torch.tensor([[0.1], [0.3], [0.7], [0.9]]), torch.tensor([0, 0, 1, 1]))
    np.testing.assert_allclose(detector.signatures(model, torch.tensor([[0.3]])), [[0.0, 0.0]], atol=1e-5)


def test_lid_value():
    # neighbours at 1, 2, 4 with k = 3: mean log(r_i / r_3) = (log 1/4 + log 1/2 + 0) / 3 = -log 2,
    # so LID = 1 / log 2 = 1.442695; a zero distance (the input itself) is skipped.
    distances = torch.tensor([[2.0, 0.0, 4.0, 1.0]], dtype=torch.float64)
    assert lid_mle(distances, 3).item() == pytest.approx(1 / math.log(2))
    model = identity_model(1)
    detector = get_detector("lid")(ks=(3,))
    reference = torch.tensor([[0.1], [0.2], [0.4], [0.9]])
    detector.prepare(model, reference, torch.zeros(4, dtype=torch.long))
    # from x = 0: neighbours at 0.1, 0.2, 0.4, the same ratios, on both read layers
    np.testing.assert_allclose(detector.signatures(model, torch.tensor([[0.0]])), [[1 / math.log(2)] * 2], rtol=1e-6)


def test_kd_bu_values():
    # mean of exp(-0^2) and exp(-1^2) = (1 + 0.367879) / 2 = 0.683940, log = -0.379885
    density = log_kernel_density(torch.tensor([[0.0]], dtype=torch.float64),
                                 torch.tensor([[0.0], [1.0]], dtype=torch.float64), 1.0)
    assert density.item() == pytest.approx(-0.379885, abs=1e-6)
    model = identity_model()
    detector = get_detector("kd_bu")(dropout=0.0, dropout_samples=3)
    detector.prepare(model, torch.tensor([[0.5, 0.2], [0.9, 0.1]]), torch.tensor([0, 0]))
    signature = detector.signatures(model, X)
    assert signature[0, -1] == pytest.approx(0.0, abs=1e-12)  # no dropout: every sample agrees, no uncertainty
    with_dropout = get_detector("kd_bu")(dropout=0.5, dropout_samples=50).prepare(model, X, torch.tensor([0]))
    assert with_dropout.signatures(model, X)[0, -1] > 0


def test_confounding_gradient_oneclass_value_and_needs_no_adversarial():
    # log features 0 and 2 standardize to -1 and +1 (variance 1); log 3 -> z = 2, squared distance 4
    detector = get_detector("confounding_gradient_oneclass")()
    assert not detector.needs_adversarial
    detector.fit(np.exp(np.array([[0.0], [2.0]])))
    assert detector.score_samples(np.exp(np.array([[3.0]])))[0] == pytest.approx(4.0)


def test_supervised_baselines_refuse_to_fit_without_adversarial_examples(separable):
    model, reference, labels, clean, _ = separable
    for name in ("lid", "kd_bu", "confounding_gradient"):
        detector = get_detector(name)()
        detector.prepare(model, reference, labels)
        with pytest.raises(ValueError, match="supervised"):
            detector.fit(detector.signatures(model, clean))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_an_inputs_signature_does_not_depend_on_its_batch(name, separable):
    """What lets a distributed audit shard inputs over ranks: an input's signature is the same
    whichever other inputs are computed with it."""
    model, reference, labels, clean, adversarial = separable
    detector = get_detector(name)()
    detector.prepare(model, reference, labels)
    inputs = torch.cat([clean, adversarial])
    whole = detector.signatures(model, inputs, batch_size=64)
    parts = np.concatenate([detector.signatures(model, inputs[rows], batch_size=7)
                            for rows in (slice(0, 13), slice(13, 50), slice(50, 80))])
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-7)


class _ReusedReLU(nn.Module):
    """One ReLU module run twice in a forward pass: a whole pass leaves its second output recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.relu, self.second, self.out = nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.second(self.relu(self.first(x)))))


@pytest.mark.parametrize("make_model", [identity_model, _ReusedReLU])
def test_mahalanobis_noisy_passes_stop_early_yet_read_what_whole_passes_read(make_model, separable, monkeypatch):
    import advdetect.detectors.mahalanobis as mahalanobis

    torch.manual_seed(0)
    model = make_model().eval()
    _, reference, labels, clean, adversarial = separable
    inputs = torch.cat([clean, adversarial])
    detector = get_detector("mahalanobis")().prepare(model, reference, labels)
    early = detector.signatures(model, inputs)
    monkeypatch.setattr(mahalanobis, "forward_until", lambda model, x, module, **kwargs: model(x))
    np.testing.assert_array_equal(early, detector.signatures(model, inputs))
