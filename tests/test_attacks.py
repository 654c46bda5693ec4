import pytest
import torch

from advdetect.attacks import ATTACKS, get_attack
from advdetect.stages.attack import attack_cell
from advdetect.errors import UsageError
from advdetect.config.suite import parse_suite


def cell(text: str):
    return parse_suite(text, "t", "t.toml").cells()[0]


def test_registry_covers_the_torchattacks_families():
    assert {"fgsm", "bim", "pgd", "cw", "deepfool", "apgd", "autoattack", "square"} <= set(ATTACKS)
    assert "multiattack" not in ATTACKS  # needs other attacks, not just a model
    with pytest.raises(UsageError, match="unknown attack 'xyz'; valid attacks: apgd, "):
        get_attack("xyz")


@pytest.mark.slow
def test_attack_cells_are_seeded_and_leave_the_global_rng_alone(tiny_model, tiny_inputs):
    pgd = cell('[[attack]]\nname = "pgd"\neps = [0.3]\nalpha = 0.1\nsteps = 2')  # random start
    labels = tiny_model(tiny_inputs).argmax(1)
    state = torch.random.get_rng_state()
    first, _ = attack_cell(tiny_model, pgd, tiny_inputs, labels, num_classes=3, seed=1, batch_size=4)
    assert torch.equal(state, torch.random.get_rng_state())
    again, _ = attack_cell(tiny_model, pgd, tiny_inputs, labels, num_classes=3, seed=1, batch_size=4)
    other, _ = attack_cell(tiny_model, pgd, tiny_inputs, labels, num_classes=3, seed=2, batch_size=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first - tiny_inputs).abs().max() <= 0.3 + 1e-6 and first.min() >= 0 and first.max() <= 1


def test_class_count_and_seed_are_filled_in_where_an_attack_takes_them(tiny_model, tiny_inputs):
    square = cell('[[attack]]\nname = "square"\neps = [0.3]\nn_queries = 5')
    labels = tiny_model(tiny_inputs).argmax(1)
    _, params = attack_cell(tiny_model, square, tiny_inputs, labels, num_classes=3, seed=7, batch_size=8)
    assert params["seed"] == 7 and params["eps"] == 0.3 and "n_classes" not in params
    apgd = cell('[[attack]]\nname = "autoattack"\neps = [0.3]\nversion = "rand"')
    assert "n_classes" in get_attack(apgd.attack_name).keywords
