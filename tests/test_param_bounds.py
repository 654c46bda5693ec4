"""Detector and attack classes declare their own parameter bounds; the registries only read them."""

import numpy as np
import pytest

from advdetect.attacks import ATTACKS, AttackEntry
from advdetect.detectors import Bounds, Detector, check_params


class Shrunk(Detector):
    """A detector whose ``shrinkage`` may be 0 and whose ``draws`` count may not, declared here only."""

    name = "shrunk_for_test"
    bounds = {**Detector.bounds, "shrinkage": Bounds(0, below=1)}

    def __init__(self, model=None, shrinkage: float = 0.5, draws: int = 4, scale: float = 1.0) -> None:
        super().__init__(model)
        self.shrinkage, self.draws, self.scale = shrinkage, draws, scale

    def signatures(self, model, inputs, *, batch_size=64):
        return np.zeros((len(inputs), 1))

    def fit_signatures(self, clean, adversarial=None):
        return self

    def score_samples(self, signatures):
        return np.zeros(len(signatures))


@pytest.mark.parametrize("params, error", [
    ({"shrinkage": 0.0}, None),                 # declared: 0 allowed
    ({"shrinkage": 1.0}, "out of range"),       # declared: below 1
    ({"scale": 0.0}, "out of range"),           # undeclared real: positive
    ({"draws": 0}, "out of range"),             # undeclared count: at least 1
    ({"draws": 2.5}, "whole number"),
])
def test_a_detector_declares_its_own_bounds(params, error):
    if error is None:
        check_params(Shrunk, params)
    else:
        with pytest.raises(ValueError, match=error):
            check_params(Shrunk, params)


def test_an_attack_class_declares_its_real_valued_keywords_and_budgets():
    class Tempered:
        real_valued = frozenset({"temperature"})
        budgets = {"rounds": 1}

        def __init__(self, model, temperature=1, rounds=10):
            pass

    entry = AttackEntry("tempered", Tempered)
    entry.check_value("temperature", 0.5)  # a whole-number default, declared real-valued
    with pytest.raises(ValueError, match="at least 1"):
        entry.check_value("rounds", 0)
    assert entry.probe_params({"rounds": 10, "temperature": 2}) == {"rounds": 1, "temperature": 2}
    # our own attacks declare theirs; torchattacks' classes get the registry's table
    assert ATTACKS["cw"].real_valued == {"c", "kappa"} and ATTACKS["orthogonal_pgd"].real_valued == {"lam"}
    assert "n_queries" in ATTACKS["square"].budgets
