"""The detect stage's shortcuts give, value for value, what each detector computed on its own before:
one plain forward pass for the detectors that read nothing else, no reference signatures for fits
that learn nothing from them, Mahalanobis' layers that read the same tensor scored once, the agnostic
detector's first gradient shared by its steps, the unseen protocol reusing the source cell's fit,
one softmax for all of ODIN's columns and all of BU's dropout masks, and first-layer weight
gradients through the unfolded input."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from advdetect.cli.commands import main
from advdetect.detectors import DETECTORS, build_detector
from advdetect.detectors.confounding_gradient import ConfoundingGradient
from advdetect.detectors.confounding_gradient_agnostic import sign_gradient_step, sign_gradient_steps
from advdetect.detectors.kd_bu import KernelDensityBayesianUncertainty
from advdetect.detectors.mahalanobis import Mahalanobis
from advdetect.detectors.odin import odin_scores
from advdetect.errors import Unavailable
from advdetect.signatures import features
from advdetect.signatures.activations import plain_forward
from advdetect.signatures.features import confounding_gradient_features, per_sample_loop_features
from advdetect.sources import embedded
from advdetect.stages.detect import Signatures
from helpers import TINY_SUITE, shuffled_digits


@pytest.fixture(scope="module")
def model():
    return embedded.default_model()


@pytest.fixture(scope="module")
def digits():
    return shuffled_digits(80)


def test_detectors_of_one_plain_forward_pass_share_it_per_chunk(model, digits):
    x, y = digits
    detectors = [build_detector(name).prepare(model, x, y, batch_size=32) for name in ("msp", "energy", "gradnorm",
                                                                                       "kd_bu")]
    assert all(d.plain_forward_only for d in detectors)
    alone = [d.signatures(model, x[:70], batch_size=32) for d in detectors]  # as the stage computed them before
    signatures, calls = Signatures(model, batch_size=32), []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    try:
        shared = [signatures.get(d, "clean", x[:70]) for d in detectors]
    finally:
        handle.remove()
    assert calls == [32, 32, 6]  # one pass per chunk for all four
    assert all(np.array_equal(a, b) for a, b in zip(shared, alone))


def test_the_shared_forward_pass_needs_no_final_linear_layer_but_for_the_features():
    model = nn.Sequential(nn.Conv2d(1, 3, 8), nn.Flatten()).eval()  # logits straight from a convolution
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    signatures = Signatures(model, batch_size=4)
    for name in ("msp", "energy"):
        assert signatures.get(build_detector(name), "clean", x).shape == (5, 1)
    with pytest.raises(Unavailable, match="no nn.Linear output layer"):
        signatures.get(build_detector("gradnorm"), "clean", x)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "confounding_gradient_agnostic" else n
                                  for n in sorted(n for n, cls in DETECTORS.items() if not cls.learns_from_clean)])
def test_a_fit_that_learns_nothing_from_clean_signatures_needs_none(name, model, digits):
    x, y = digits
    detector = build_detector(name).prepare(model, x[:60], y[:60], batch_size=64)
    test = detector.signatures(model, x[60:], batch_size=64)
    with_signatures = detector.fit_signatures(detector.signatures(model, x[:60], batch_size=64))
    scores, params = with_signatures.score_samples(test), with_signatures.fitted_params()
    without = detector.fit_signatures(np.empty((0, 0)))  # what the detect stage passes it
    assert np.array_equal(without.score_samples(test), scores)
    assert without.fitted_params() == params


def test_mahalanobis_scores_a_layer_that_reads_an_earlier_ones_tensor_once(model, digits, monkeypatch):
    x, y = digits
    detector = Mahalanobis(noises=(0.0, 0.002)).prepare(model, x[:60], y[:60], batch_size=64)
    once = detector.signatures(model, x[60:], batch_size=16)
    width = len(detector.means_)
    # the default model's last hidden layer read (its head's ReLU) is the final linear layer's input
    for block in range(2):
        assert np.array_equal(once[:, block * width + width - 1], once[:, block * width + width - 2])
    monkeypatch.setattr(Mahalanobis, "_twins", staticmethod(lambda captured, calls, same_fit: {}))
    assert np.array_equal(detector.signatures(model, x[60:], batch_size=16), once)  # each layer on its own


def test_the_agnostic_steps_share_their_first_gradient(model, digits):
    x, y = digits
    runs = [(0.05, 1), (0.15, 1), (0.05, 3)]
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    try:
        shared = sign_gradient_steps(model, x, y, runs, batch_size=32)
    finally:
        handle.remove()
    assert len(calls) == 3 * (1 + 2)  # per batch: one gradient at the inputs, two more steps
    for moved, (epsilon, steps) in zip(shared, runs):
        assert torch.equal(moved, sign_gradient_step(model, x, y, epsilon, batch_size=32, steps=steps))


def test_odin_takes_one_softmax_for_every_column(model, digits):
    x = digits[0][:40]
    temperatures, epsilons = (1.0, 1000.0), (0.0, 0.0014, 0.006)
    columns = []  # one softmax per (temperature, epsilon), as the scores were computed before
    for batch in x.split(16):
        x_grad = batch.clone().requires_grad_(True)
        logits = model(x_grad)
        batch_columns = []
        for temperature in temperatures:
            loss = nn.functional.cross_entropy(logits / temperature, logits.argmax(dim=1), reduction="sum")
            step = torch.autograd.grad(loss, x_grad, retain_graph=True)[0].sign()
            with torch.no_grad():
                for epsilon in epsilons:
                    moved = model(batch - epsilon * step) if epsilon else logits.detach()
                    batch_columns.append(torch.softmax(moved.double() / temperature, dim=1).max(dim=1).values)
        columns.append(torch.stack(batch_columns, dim=1))
    assert np.array_equal(odin_scores(model, x, temperatures, epsilons, batch_size=16), torch.cat(columns).numpy())


def test_bayesian_uncertainty_takes_one_softmax_for_every_dropout_mask(model, digits):
    x, y = digits
    detector = KernelDensityBayesianUncertainty(dropout_samples=7).prepare(model, x[:60], y[:60])
    features = plain_forward(model, x[60:]).penultimate()
    last = model.classifier[-1]
    keep = torch.rand((7, features.shape[1]), generator=torch.Generator().manual_seed(0), dtype=torch.float64) >= 0.5
    first, second = 0.0, 0.0  # one mask at a time, as before
    for mask in keep:
        probs = torch.softmax(nn.functional.linear(features * mask / 0.5, last.weight.double(), last.bias.double()), 1)
        first, second = first + probs.pow(2).sum(dim=1), second + probs
    expected = first / 7 - (second / 7).pow(2).sum(dim=1)
    assert torch.equal(detector._uncertainty(model, features), expected)


class FirstLayers(nn.Module):
    """Layers whose unfolded input is no larger than their output, as first layers are: a grouped,
    strided 2-D convolution, a dilated one and a 1-D one; and one that takes the grouped-convolution
    path, wide in and narrow out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 24, 3, stride=2, padding=1, groups=2)
        self.dilated = nn.Conv2d(2, 24, 3, padding=2, dilation=2)
        self.wide = nn.Conv2d(24, 6, 3, padding=1)
        self.line = nn.Conv1d(1, 8, 3, padding=1)
        self.head = nn.Linear(6 * 4 + 24 + 8 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = nn.functional.adaptive_avg_pool2d
        strided, dilated = torch.relu(self.conv(x)), torch.relu(self.dilated(x))
        wide, line = torch.relu(self.wide(strided)), torch.relu(self.line(x[:, :1, 0, :5]))
        return self.head(torch.cat([pool(wide, 2).flatten(1), pool(dilated, 1).flatten(1), line.flatten(1)], 1))


def test_first_layer_weight_gradients_through_the_unfolded_input(monkeypatch):
    torch.manual_seed(0)
    model = FirstLayers().double().eval()
    x = torch.rand(5, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grouped = []
    original = features._per_input_conv_weight
    monkeypatch.setattr(features, "_per_input_conv_weight",
                        lambda x, g, shape, config: grouped.append(tuple(shape)) or original(x, g, shape, config))
    fast = confounding_gradient_features(model, x, batch_size=3)
    assert set(grouped) == {(6, 24, 3, 3)}  # only the wide layer takes the grouped convolution
    torch.testing.assert_close(fast, per_sample_loop_features(model, x, batch_size=3), rtol=1e-10, atol=0)


@pytest.mark.slow
def test_the_unseen_protocol_reuses_the_fit_on_its_source_cell(tmp_path, monkeypatch):
    fits = []
    original = ConfoundingGradient.fit_signatures

    def counted(self, clean, adversarial=None):
        fits.append(len(clean))
        return original(self, clean, adversarial)

    monkeypatch.setattr(ConfoundingGradient, "fit_signatures", counted)
    (tmp_path / "suite.toml").write_text(TINY_SUITE)
    assert main(["audit", str(tmp_path / "suite.toml"), "--n", "60", "--detectors", "confounding_gradient",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "-q"]) == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    seen = [r for r in rows if r["protocol"] == "seen" and r["reason"] is None]
    unseen = [r for r in rows if r["protocol"] == "unseen" and r["reason"] is None]
    assert unseen and all(r["detector_params"]["C"] == next(s["detector_params"]["C"] for s in seen if
                          f"{s['attack']}[{s['strength_name']}={s['strength']:g}]" == r["detector_params"]["fitted_on"])
                          for r in unseen)
    assert len(fits) == len(seen)  # one fit per seen row; the unseen rows refit nothing
