import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyCNN
from helpers import results_without_timings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from advdetect.sources import embedded
from advdetect.stages import attack as attack_stage
from advdetect.attacks.cache import AttackCache, attack_budget, gradient_fingerprint, quantized
from advdetect.cli.commands import main
from advdetect.sources.models import state_dict_sha256
from advdetect.run.storage import save_arrays

SUITE = """
[[attack]]
name = "fgsm"
eps = [0.3]

[[attack]]
name = "pgd"          # random start: the cache must keep its seeded result
eps = [0.3]
alpha = 0.1
steps = 2
"""


@pytest.fixture
def audit_twice(tmp_path, monkeypatch):
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE)

    def run(name):
        args = ["audit", str(suite), "--n", "60", "--detectors", "confounding_gradient,msp",
                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / name)]
        assert main(args) == 0
        return tmp_path / name

    return run


@pytest.mark.slow
def test_a_repeated_audit_does_no_attack_work_and_writes_the_same_results(audit_twice, monkeypatch):
    first = audit_twice("first")

    def no_attacks(*args, **kwargs):
        raise AssertionError("attack work in a cached run")

    monkeypatch.setattr(attack_stage, "attack_cell", no_attacks)
    second = audit_twice("second")
    assert results_without_timings(first) == results_without_timings(second)
    assert json.loads((second / "run.json").read_text())["attack_cache_hits"] == 2


@pytest.mark.slow
def test_a_corrupt_cache_entry_is_recomputed_not_trusted(audit_twice, tmp_path, caplog):
    first = audit_twice("first")
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:200])  # truncated
    data = bytearray(entries[1].read_bytes())
    entries[1].write_bytes(bytes(data[: len(data) // 2]) + bytes(len(data) - len(data) // 2))  # zeroed tail
    second = audit_twice("second")
    assert results_without_timings(first) == results_without_timings(second)
    assert caplog.text.count("is unreadable") == 2
    assert json.loads((second / "run.json").read_text())["attack_cache_hits"] == 0
    third = audit_twice("third")  # the recomputed entries were written back whole
    assert json.loads((third / "run.json").read_text())["attack_cache_hits"] == 2


def test_an_entry_under_the_wrong_key_is_not_trusted(tmp_path):
    import torch

    from advdetect.attacks.cache import AttackCache

    cache = AttackCache(tmp_path)
    x = torch.rand(3, 1, 4, 4)
    cache.store("a" * 64, x)
    cache.path("a" * 64).rename(cache.path("b" * 64).parent.mkdir(parents=True, exist_ok=True) or cache.path("b" * 64))
    assert cache.load("b" * 64, x) is None
    cache.store("c" * 64, x)
    assert torch.equal(cache.load("c" * 64, x), x)
    assert cache.load("c" * 64, torch.rand(2, 1, 4, 4)) is None  # another shape


# --- issue 22: the key covers what an attack reads; an entry is checked before it is trusted -------

KEY = "e" * 64
PROPERTIES = settings(max_examples=60, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4)
unit = st.floats(0, 1, width=32)


@st.composite
def clean_and_adversarial(draw, shape=shapes):
    """(clean inputs, adversarial inputs), both float32 in [0, 1] and of the same shape."""
    shape = draw(shape)
    return draw(hnp.arrays(np.float32, shape, elements=unit)), draw(hnp.arrays(np.float32, shape, elements=unit))


def row_sizes(x_adv: np.ndarray, x: np.ndarray, norm: str) -> np.ndarray:
    delta = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
    return np.abs(delta).max(axis=1) if norm == "Linf" else np.sqrt((delta ** 2).sum(axis=1))


def load_stored(x_adv: np.ndarray, like: np.ndarray, budget=None, raw: bool = False):
    """Store ``x_adv`` (through the cache, or as a raw npz for what the cache would not write), load it
    back against ``like``; returns (what load returned, whether the entry is still there)."""
    with tempfile.TemporaryDirectory() as folder:
        cache = AttackCache(Path(folder))
        if raw:
            save_arrays(cache.path(KEY), key=np.array(KEY), x_adv=x_adv)
        else:
            cache.store(KEY, torch.from_numpy(x_adv))
        loaded = cache.load(KEY, torch.from_numpy(like), budget=budget)
        return loaded, cache.path(KEY).is_file()


def assert_refused(caplog, loaded, kept: bool, problem: str) -> None:
    assert loaded is None
    assert not kept  # deleted: the recomputed entry takes its place
    assert "is invalid" in caplog.text and problem in caplog.text, caplog.text


@PROPERTIES
@given(clean_and_adversarial(), st.sampled_from(["Linf", "L2", None]), st.floats(1, 2))
def test_a_valid_entry_within_its_budget_round_trips_exactly(pair, norm, slack):
    x, x_adv = pair
    budget = (norm, float(row_sizes(x_adv, x, norm).max()) * slack) if norm else None  # slack 1: on the boundary
    loaded, kept = load_stored(x_adv, x, budget)
    assert loaded is not None and kept
    assert loaded.dtype == torch.float32 and np.array_equal(loaded.numpy(), x_adv)


@PROPERTIES
@given(clean_and_adversarial(), st.sampled_from(["Linf", "L2"]), st.floats(0, 0.99), st.data())
def test_an_entry_with_a_row_outside_its_budget_is_a_miss(caplog, pair, norm, fraction, data):
    x, x_adv = pair
    sizes = row_sizes(x_adv, x, norm)
    eps = float(sizes.max()) * fraction
    if sizes.max() <= eps * (1 + 1e-5) + 1e-5 + 1e-4:  # within the tolerance: make one row plainly outside
        row = data.draw(st.integers(0, len(x) - 1))
        x_adv = x_adv.copy()
        x_adv[row].flat[0] = 1.0 if x[row].flat[0] < 0.5 else 0.0  # |delta| >= 0.5
        eps = data.draw(st.floats(0, 0.4))
    caplog.clear()
    loaded, kept = load_stored(x_adv, x, (norm, eps))
    assert_refused(caplog, loaded, kept, f"exceed the {norm} budget")


@PROPERTIES
@given(clean_and_adversarial(), st.sampled_from([np.nan, np.inf, -np.inf]), st.data(),
       st.sampled_from([None, ("Linf", 1.0), ("L2", 1e3)]))
def test_an_entry_with_a_non_finite_value_is_a_miss(caplog, pair, bad, data, budget):
    x, x_adv = pair
    x_adv = x_adv.copy()
    x_adv.flat[data.draw(st.integers(0, x_adv.size - 1))] = bad
    caplog.clear()
    loaded, kept = load_stored(x_adv, x, budget)
    assert_refused(caplog, loaded, kept, "non-finite values")


@PROPERTIES
@given(clean_and_adversarial(), st.one_of(st.floats(-10, 0, exclude_max=True, width=32),
                                          st.floats(1, 10, exclude_min=True, width=32)), st.data(),
       st.sampled_from([None, ("Linf", 1e3), ("L2", 1e3)]))
def test_an_entry_with_a_value_outside_the_unit_interval_is_a_miss(caplog, pair, bad, data, budget):
    x, x_adv = pair
    x_adv = x_adv.copy()
    x_adv.flat[data.draw(st.integers(0, x_adv.size - 1))] = bad
    caplog.clear()
    loaded, kept = load_stored(x_adv, x, budget)
    assert_refused(caplog, loaded, kept, "values outside [0, 1]")


@PROPERTIES
@given(clean_and_adversarial(), shapes, st.sampled_from([None, ("Linf", 1.0)]))
def test_an_entry_of_another_shape_is_a_miss(caplog, pair, other_shape, budget):
    x, x_adv = pair
    like = np.zeros(other_shape, np.float32)
    if like.shape == x_adv.shape:
        like = np.zeros((len(x_adv) + 1, *x_adv.shape[1:]), np.float32)
    caplog.clear()
    loaded, kept = load_stored(x_adv, like, budget)
    assert_refused(caplog, loaded, kept, f"shape {x_adv.shape}, expected {like.shape}")


@PROPERTIES
@given(clean_and_adversarial(), st.sampled_from([np.float64, np.float16, np.int64, np.uint8, np.bool_]))
def test_an_entry_of_another_dtype_is_a_miss(caplog, pair, dtype):
    x, x_adv = pair
    caplog.clear()
    loaded, kept = load_stored(x_adv.astype(dtype), x, raw=True)
    assert_refused(caplog, loaded, kept, f"dtype {np.dtype(dtype)}, expected float32")


def test_the_budget_is_the_attacks_norm_and_eps():
    assert attack_budget("fgsm", {"eps": 0.3}) == ("Linf", 0.3)
    assert attack_budget("pgdl2", {"eps": 1, "alpha": 0.2}) == ("L2", 1.0)
    assert attack_budget("apgd", {"eps": 0.5, "norm": "L2"}) == ("L2", 0.5)
    assert attack_budget("cw", {"c": 1.0}) is None  # minimum-norm: no budget
    assert attack_budget("deepfool", {"steps": 50}) is None
    assert attack_budget("eadl1", {"eps": 0.3}) is None  # an L1 threat model: not checked
    assert attack_budget("fgsm", {"eps": True}) is None
    assert attack_budget("fgsm", {"eps": float("nan")}) is None


def test_quantized_ignores_noise_far_below_the_largest_value():
    assert quantized(np.array([2.5, 1e-9])) == quantized(np.array([2.5, -1e-9]))  # no -0, no noise
    assert quantized(np.array([2.5, 0.0])) == quantized(np.array([2.50000001, 0.0]))
    assert quantized(np.array([2.5, 0.0])) != quantized(np.array([2.501, 0.0]))  # 4 significant digits
    assert quantized(np.zeros(3)) != quantized(np.zeros(4))
    assert quantized(np.array([np.nan, 1.0])) != quantized(np.array([np.inf, 1.0]))


class RoundsItsInput(TinyCNN):
    """TinyCNN behind ``round(x * 255) / 255``: the same weights, the same logits on 8-bit inputs, and
    a zero input gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.round(x * 255) / 255)


def eight_bit(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255) / 255


def test_the_fingerprint_is_the_same_for_the_same_model(tiny_model, tiny_inputs):
    x, y = eight_bit(tiny_inputs), torch.tensor([0, 1, 2, 0, 1, 2])
    rng = torch.get_rng_state()
    tiny_model.train()
    tiny_model.bn.eval()
    first = gradient_fingerprint(tiny_model, x, y)
    # each layer's mode and the global RNG are left as they were
    assert tiny_model.training and tiny_model.conv.training and not tiny_model.bn.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert gradient_fingerprint(tiny_model, x, y) == first
    assert gradient_fingerprint(copy.deepcopy(tiny_model).eval(), x.clone(), y.clone()) == first
    assert gradient_fingerprint(tiny_model, torch.cat([x, x]), torch.cat([y, y])) != first  # the first 8 rows


def test_the_fingerprint_tells_a_model_from_the_same_model_behind_input_rounding(tiny_model, tiny_inputs):
    x, y = eight_bit(tiny_inputs), torch.tensor([0, 1, 2, 0, 1, 2])
    rounding = RoundsItsInput()
    rounding.load_state_dict(tiny_model.state_dict())
    rounding.eval()
    # what the key held before: the same weights, the same logits on the attacked inputs
    assert state_dict_sha256(rounding) == state_dict_sha256(tiny_model)
    with torch.no_grad():
        assert torch.equal(rounding(x), tiny_model(x))
    assert gradient_fingerprint(rounding, x, y) != gradient_fingerprint(tiny_model, x, y)


def test_the_fingerprint_tells_the_default_model_from_itself_behind_input_rounding():
    model = embedded.default_model()
    x, y = embedded.test_split()
    x, y = x[:8], y[:8]
    rounding = copy.deepcopy(model)
    forward = type(model).forward
    rounding.forward = lambda inputs: forward(rounding, eight_bit(inputs))
    with torch.no_grad():
        assert torch.equal(rounding(x), model(x))
    assert gradient_fingerprint(rounding, x, y) != gradient_fingerprint(model, x, y)
    assert gradient_fingerprint(model, x, y) == gradient_fingerprint(model, x, y)


def test_the_fingerprint_tells_other_weights_apart(tiny_model, tiny_inputs):
    x, y = tiny_inputs, torch.tensor([0, 1, 2, 0, 1, 2])
    fingerprint = gradient_fingerprint(tiny_model, x, y)
    for tweak in (lambda m: m.conv.weight.mul_(1.001), lambda m: m.head.bias[0].add_(1e-3)):
        other = copy.deepcopy(tiny_model)
        with torch.no_grad():
            tweak(other)
        assert state_dict_sha256(other) != state_dict_sha256(tiny_model)
        assert gradient_fingerprint(other, x, y) != fingerprint


ONE_FGSM = """
[[attack]]
name = "fgsm"
eps = [0.3]
"""

ROUNDING_MODEL = """
import torch
from advdetect.sources.embedded import TRAINING, SmallCNN, default_model


class RoundsItsInput(SmallCNN):
    def forward(self, x):
        return super().forward(torch.round(x * 255) / 255)


def build():
    model = RoundsItsInput(TRAINING["width"])
    model.load_state_dict(default_model().state_dict())
    return model.eval()
"""


@pytest.fixture
def audit_one_fgsm(tmp_path):
    suite = tmp_path / "one.toml"
    suite.write_text(ONE_FGSM)
    (tmp_path / "rounding.py").write_text(ROUNDING_MODEL)

    def run(name, model="default"):
        args = ["audit", str(suite), "--model", model, "--n", "40", "--detectors", "msp",
                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / name)]
        assert main(args) == 0
        return tuple(json.loads((tmp_path / name / part).read_text()) for part in ("run.json", "results.json"))

    return run


@pytest.mark.slow
def test_a_model_that_rounds_its_input_does_not_inherit_the_default_models_attacks(audit_one_fgsm, tmp_path):
    default_run, default_results = audit_one_fgsm("default")
    rounding_run, rounding_results = audit_one_fgsm("rounding", model=f"{tmp_path / 'rounding.py'}:build")
    assert rounding_run["attack_cache_hits"] == 0
    assert default_results["attacks"][0]["n_fooled"] > 0
    assert rounding_results["attacks"][0]["n_fooled"] == 0  # its input gradient is 0: FGSM cannot move it


@pytest.mark.slow
def test_a_cache_entry_outside_the_attacks_budget_is_recomputed_not_trusted(audit_one_fgsm, tmp_path, caplog):
    first_run, first = audit_one_fgsm("first")
    (entry,) = (tmp_path / "cache").rglob("*.npz")
    with np.load(entry) as stored:
        key, x_adv = stored["key"], stored["x_adv"]
    save_arrays(entry, key=key, x_adv=np.zeros_like(x_adv))  # finite, in [0, 1], but every row moved by up to 1
    second_run, second = audit_one_fgsm("second")
    assert second_run["attack_cache_hits"] == 0
    assert "exceed the Linf budget eps=0.3" in caplog.text
    for results in (first, second):
        for attack in results["attacks"]:
            attack.pop("seconds")
    assert first["attacks"] == second["attacks"]
    third_run, _ = audit_one_fgsm("third")  # the recomputed entry was written back
    assert third_run["attack_cache_hits"] == 1
