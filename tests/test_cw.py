"""CW-L2 with the paper's success criterion against torchattacks' own."""

import pytest
import torch
import torchattacks
from torch import nn

from helpers import inputs_labelled_by, small_mlp

from advdetect.attacks import get_attack
from advdetect.attacks.cw import CW

N_CLASSES = 4


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return small_mlp(7, N_CLASSES)


@pytest.fixture(scope="module")
def data(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs_labelled_by(model, 32, 7)


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest other logit minus the label's: positive when misclassified."""
    with torch.no_grad():
        logits = model(x)
    other = logits.masked_fill(nn.functional.one_hot(y, N_CLASSES).bool(), -torch.inf).max(1).values
    return other - logits.gather(1, y[:, None])[:, 0]


def test_cw_is_registered_in_place_of_torchattacks():
    assert get_attack("cw").factory is CW


@pytest.mark.parametrize("c", [0.1, 1.0, 10.0])
def test_at_kappa_0_the_same_images_as_torchattacks(model, data, c):
    x, y = data
    theirs = torchattacks.CW(model, c=c, kappa=0, steps=30, lr=0.05)(x, y)
    ours = CW(model, c=c, kappa=0, steps=30, lr=0.05)(x, y)
    assert torch.equal(ours, theirs)
    assert (margins(model, ours, y) > 0).sum() >= (4 if c >= 1 else 0)  # at c >= 1 the attack fools some


def test_targeted_at_kappa_0_the_same_images_as_torchattacks(model, data):
    x, y = data
    images = []
    for attack in (torchattacks.CW(model, c=10.0, steps=30, lr=0.05), CW(model, c=10.0, steps=30, lr=0.05)):
        attack.set_mode_targeted_by_function(lambda inputs, labels: (labels + 1) % N_CLASSES)
        images.append(attack(x, y))
    assert torch.equal(images[0], images[1])


def test_every_adversarial_example_has_the_margin_kappa_asks_for(model, data):
    """torchattacks keeps misclassified iterates of any margin; ours only those past kappa."""
    x, y = data
    kappa = 0.2  # clean margins here are -0.3 to 0
    params = dict(c=10.0, kappa=kappa, steps=100, lr=0.1)
    ours, theirs = CW(model, **params)(x, y), torchattacks.CW(model, **params)(x, y)
    changed = (ours != x).flatten(1).any(1)
    assert changed.sum() >= 20  # the search reaches the margin for many inputs
    assert (margins(model, ours[changed], y[changed]) >= kappa - 1e-5).all()
    assert torch.equal(ours[~changed], x[~changed])  # the others come back unchanged: not fooled
    their_margins = margins(model, theirs, y)
    assert ((their_margins > 0) & (their_margins < kappa)).any()  # what this class exists for


def test_the_criterion_on_logits_by_hand(model):
    attack = CW(model, kappa=2.0)
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 3.5, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    assert attack.is_adversarial(logits, labels).tolist() == [0.0, 1.0, 0.0]  # margins -2, 2.5, 1
    attack.set_mode_targeted_by_function(lambda inputs, labels: labels)
    assert attack.is_adversarial(logits, torch.tensor([1, 1, 1])).tolist() == [0.0, 1.0, 0.0]


def test_without_the_early_stop_every_step_runs_and_no_example_grows(model, data):
    """Same search, only longer: each input's smallest adversarial example can only shrink."""
    x, y = data
    calls = []
    counted = nn.Sequential(model)
    counted.register_forward_hook(lambda module, inputs, output: calls.append(1))
    params = dict(c=10.0, kappa=0.0, steps=60, lr=0.1)
    stopped = CW(counted, **params)(x, y)
    n_stopped, calls[:] = len(calls), []
    full = CW(counted, abort_early=False, **params)(x, y)
    assert len(calls) == 60 and n_stopped < 60  # torchattacks' early stop ended the first search
    fooled = (margins(model, stopped, y) > 0) & (margins(model, full, y) > 0)
    assert fooled.sum() >= 20
    distance = lambda adv: (adv - x).flatten(1).norm(dim=1)[fooled]
    assert (distance(full) <= distance(stopped) + 1e-6).all() and (distance(full) < distance(stopped)).any()
