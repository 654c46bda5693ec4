"""Gradient-masking symptoms (advdetect.attacks.masking): the decision rules on hand-made counts, and the
check on tiny models built to show each symptom, beside an honest model that shows none.

Every model is the same small MLP, trained for a second on scikit-learn's 8x8 digits (grey levels
k/16, scaled to [0, 1]), behind a forward that masks its gradient in one known way. The models of
symptoms 2 and 3 use the digits' grid of 16 grey levels to tell how far an input was moved, which
no real model does; they are built to make one symptom show for the reason the symptom names,
and each test checks that reason too (the honest model fooled at the point the attack missed)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack
from sklearn.datasets import load_digits
from torch import nn

from advdetect.attacks.masking import NAMES, Symptom, beats, decide, masking_symptoms, suspected

EPS = 1 / 16  # one grey level of the digits
GRID = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """An MLP trained for 300 full-batch Adam steps on 1400 digits (about 96% held-out accuracy),
    and 64 held-out digits it classifies correctly."""
    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / GRID
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1400], order[1400:]
    train_images, train_labels = images[train], labels[train]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(net(train_images), train_labels).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        correct = held_out[net(images[held_out]).argmax(1) == labels[held_out]]
    assert len(correct) > 0.9 * len(held_out)
    return net, images[correct[:64]], labels[correct[:64]]


class Wrapped(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


class Rounded(Wrapped):
    """Input quantisation, ``round(x * 255) / 255``: the gradient is zero almost everywhere."""

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)


class Tempered(Wrapped):
    """The honest logits times ``temperature``: the same decisions, a saturated softmax."""

    def __init__(self, net: nn.Module, temperature: float) -> None:
        super().__init__(net)
        self.temperature = temperature

    def forward(self, x):
        return self.net(x) * self.temperature


class Oscillating(Wrapped):
    """The honest logits divided by 1 + 10 * mean(1 - cos(2 pi x / EPS)): a factor that changes no
    decision and is 1 on the digits' grid, but whose gradient oscillates with period EPS. At a digit
    its gradient is 0, so FGSM follows the honest gradient and lands (EPS away) on the grid again,
    where the model is the honest one. PGD moves in steps of EPS / 8 from a random start, and the
    oscillation's gradient, which outweighs the honest one away from the grid, traps most pixels
    near the half-grid point closest to their start: a shattered loss surface on which one large
    step beats many small ones."""

    def forward(self, x):
        ripple = (1 - torch.cos(2 * math.pi * x / EPS)).flatten(1).mean(1, keepdim=True)
        return self.net(x) / (1 + 10 * ripple)


class Clipped(Wrapped):
    """Sees a pixel's offset d from the digits' grid (|d| < 1/32) amplified ten times, but clipped to
    [-r, r] while |d| < 3.75 r, and as +-4 r (sign(d), no gradient) beyond: the gradient is the
    honest one within r of a digit and zero further out. PGD at r follows it to the corner of the
    r-box; at 4 r its random start leaves most pixels in the flat band, with a random sign, so the
    larger budget does worse, although FGSM at 4 r reaches the band beyond 3.75 r where the model
    sees the full perturbation."""

    def __init__(self, net: nn.Module, r: float) -> None:
        super().__init__(net)
        self.r = r

    def forward(self, x):
        grid = torch.round(x * GRID) / GRID
        offset = x - grid
        flat = offset.clamp(-self.r, self.r)
        seen = torch.where(offset.abs() < 3.75 * self.r, flat, 4 * self.r * torch.sign(offset))
        return self.net(grid + 10 * seen)


def observed(symptoms: list[Symptom]) -> set[str]:
    assert [s.name for s in symptoms] == list(NAMES)
    return {s.name for s in suspected(symptoms)}


def fooled_by(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    adversarial = attack(x, y)
    with torch.no_grad():
        return int((model(adversarial).argmax(1) != y).sum())


def count_in(symptom: Symptom, position: int) -> int:
    """The ``position``-th "K of N" count of a symptom's detail."""
    return int(re.findall(r"(\d+) of \d+ inputs", symptom.detail)[position])


def test_not_noise_margin():
    assert beats(4, 0, 64) and not beats(3, 0, 64)  # 5% of 64 is 3.2: 4 inputs
    assert beats(30, 26, 64) and not beats(29, 26, 64)
    assert beats(5, 0, 100) and not beats(4, 0, 100)
    assert beats(2, 0, 20) and not beats(1, 0, 20)  # 5% of 20 is one input: at least 2
    assert not beats(0, 4, 64)


@pytest.mark.parametrize("change, symptom", [
    ({}, None),
    ({"zero_gradients": 32}, None),  # half is not most
    ({"zero_gradients": 33}, "vanishing_gradients"),
    ({"fgsm": 29}, None),  # 3 more than PGD's 26: noise
    ({"fgsm": 30}, "one_step_beats_iterative"),
    ({"pgd_larger": 27}, None),
    ({"pgd_larger": 26}, "no_growth_with_budget"),
    ({"pgd_larger": 20}, "no_growth_with_budget"),
    ({"pgd": 64, "pgd_larger": 64, "fgsm": 50, "gradient_free": 60}, None),  # 100% at eps: nothing to grow
    ({"gradient_free": 29}, None),
    ({"gradient_free": 30}, "gradient_free_beats_gradient"),
    ({"unbounded": 63}, "unbounded_attack_fails"),  # 98.4% < 99%
])
def test_decision_rules_on_hand_made_counts(change, symptom):
    counts = {"zero_gradients": 0, "fgsm": 20, "pgd": 26, "pgd_larger": 60, "gradient_free": 19, "unbounded": 64,
              **change}
    symptoms = decide(n=64, eps=EPS, steps=20, **counts)
    assert observed(symptoms) == ({symptom} if symptom else set())
    assert all(s.detail for s in symptoms)


def test_unbounded_rule_at_99_percent():
    counts = {"zero_gradients": 0, "fgsm": 20, "pgd": 26, "pgd_larger": 60, "gradient_free": 19}
    assert not observed(decide(n=100, eps=EPS, steps=20, unbounded=99, **counts))
    assert observed(decide(n=100, eps=EPS, steps=20, unbounded=98, **counts)) == {"unbounded_attack_fails"}


def test_symptom_dict_and_suspected():
    shown, hidden = Symptom("vanishing_gradients", True, "zero on 9 of 9 inputs"), Symptom("x", False, "y")
    assert shown.to_dict() == {"name": "vanishing_gradients", "observed": True, "detail": "zero on 9 of 9 inputs"}
    assert suspected([hidden, shown]) == [shown]
    with pytest.raises(AttributeError):
        shown.observed = False


def test_honest_model_shows_no_symptom(digits):
    net, x, y = digits
    symptoms = masking_symptoms(net, x, y, eps=EPS, seed=0)
    assert observed(symptoms) == set(), [s.detail for s in symptoms]
    pgd = count_in(symptoms[1], 1)
    assert 0.1 * len(x) < pgd < 0.9 * len(x)  # a sensible eps: symptoms 2 to 4 could have shown


def test_rounded_input_masks_the_gradient(digits):
    net, x, y = digits
    symptoms = masking_symptoms(Rounded(net), x, y, eps=EPS, seed=0)
    assert {"vanishing_gradients", "unbounded_attack_fails", "gradient_free_beats_gradient"} <= observed(symptoms)
    assert symptoms[0].detail == f"the input gradient of the loss is zero on {len(x)} of {len(x)} inputs"


def test_zero_gradient_threshold_spares_a_confident_model_and_catches_a_saturated_one(digits):
    net, x, y = digits
    confident, saturated = Tempered(net, 5.0), Tempered(net, 100.0)
    grad = torch.func.grad(lambda v: F.cross_entropy(confident(v), y, reduction="sum"))(x)
    assert (grad.abs().flatten(1).amax(1) < 1e-12).sum() > len(x) / 2  # a fixed 1e-12 would call it masked...
    shown = observed(masking_symptoms(confident, x, y, eps=EPS, seed=0))
    assert "vanishing_gradients" not in shown and not shown  # ... yet PGD follows its gradient as on the honest model
    shown = observed(masking_symptoms(saturated, x, y, eps=EPS, seed=0))  # distillation-like: float32 underflows
    assert {"vanishing_gradients", "unbounded_attack_fails"} <= shown


def test_oscillating_loss_lets_one_step_beat_pgd(digits):
    net, x, y = digits
    model = Oscillating(net)
    symptoms = masking_symptoms(model, x, y, eps=EPS, seed=0)
    shown = observed(symptoms)
    assert "one_step_beats_iterative" in shown and "vanishing_gradients" not in shown
    # the reason: FGSM's points are the honest model's FGSM points, which PGD's small steps never reach
    assert count_in(symptoms[1], 0) == fooled_by(torchattacks.FGSM(net, eps=EPS), net, x, y)


def test_flat_band_stops_pgd_from_growing_with_the_budget(digits):
    net, x, y = digits
    r = 1 / 160  # 4 r = 0.025 stays below half a grey level (1/32)
    model = Clipped(net, r)
    symptoms = masking_symptoms(model, x, y, eps=r, seed=0)
    shown = observed(symptoms)
    assert "no_growth_with_budget" in shown and "vanishing_gradients" not in shown
    # not robustness: a single step of the larger budget fools more than PGD did at either budget
    pgd_at_eps, pgd_larger = count_in(symptoms[2], 0), count_in(symptoms[2], 1)
    assert pgd_larger < fooled_by(torchattacks.FGSM(model, eps=4 * r), model, x, y) and pgd_at_eps < len(x)


def test_seeded_on_the_device_without_touching_the_global_rng(digits):
    net, x, y = digits
    model, x, y = Rounded(net), x[:16], y[:16]
    state = torch.get_rng_state()
    with torch.no_grad():  # the check computes gradients whatever the caller's mode
        first = masking_symptoms(model, x, y, eps=EPS, seed=3, batch_size=10, steps=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert masking_symptoms(model, x, y, eps=EPS, seed=3, batch_size=10, steps=5) == first
    assert "vanishing_gradients" in observed(first)


def test_rejects_what_it_cannot_check(digits):
    net, x, y = digits
    with pytest.raises(ValueError, match="misclassifies 1 of the 4 inputs"):
        masking_symptoms(net, x[:4], torch.cat([(y[:1] + 1) % 10, y[1:4]]), eps=EPS, seed=0)
    with pytest.raises(ValueError, match="images"):
        masking_symptoms(net, x[:4].flatten(1), y[:4], eps=EPS, seed=0)
    with pytest.raises(ValueError, match="eps"):
        masking_symptoms(net, x[:4], y[:4], eps=0.0, seed=0)
