"""``autoattack`` runs the reference AutoAttack (pyautoattack): as strong as the reference run by hand, at least as
strong as torchattacks' own, and its keywords refused before any work."""

import time

import pyautoattack
import pytest
import torch
import torchattacks
from sklearn.datasets import load_digits
from torch import nn

from advdetect.attacks import ATTACKS, NOT_PROBED, get_attack
from advdetect.attacks.autoattack import AutoAttack
from advdetect.errors import UsageError
from advdetect.stages.preflight import probe_attacks
from advdetect.config.suite import load_suite, parse_suite

N = 20
EPS = 0.1  # Linf, on 8x8 digits in [0, 1]: about half the inputs stay robust


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Inputs this small take longer to share among threads than to compute, more so on a busy machine (where two
    threads made the three AutoAttack runs 20 times slower); module-scoped, so it holds for the module's fixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained (a fraction of a second) on sklearn's 8x8 digits, and N held-out digits."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        optimizer = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(8):
            for start in range(0, 1500, 100):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[start:start + 100]), y[start:start + 100]).backward()
                optimizer.step()
    return model.eval(), x[1500:1500 + N], y[1500:1500 + N]


def robust(model: nn.Module, adversarial: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(adversarial).argmax(1) == y).sum())


@pytest.fixture(scope="module")
def runs(digits) -> dict[str, torch.Tensor]:
    """The adversarial digits of the registered attack, of pyautoattack run by hand and of torchattacks'
    AutoAttack, all 'standard' at Linf EPS with seed 0 (about 3 x 5 s on one busy core)."""
    model, x, y = digits
    state = torch.random.get_rng_state()
    attack = get_attack("autoattack").build(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    wrapper = attack(x, y)
    assert torch.equal(state, torch.random.get_rng_state())  # the reference reseeds torch, but on a fork
    reference = pyautoattack.AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, device="cpu")
    reference.verbose = False
    by_hand, _ = reference.run_standard_evaluation(x, y, batch_size=len(x))
    ours = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)(x, y)
    return {"wrapper": wrapper, "pyautoattack": by_hand, "torchattacks": ours}


@pytest.mark.slow
def test_autoattack_is_the_reference_and_no_weaker_than_torchattacks(digits, runs):
    model, x, y = digits
    found = {name: robust(model, adversarial, y) for name, adversarial in runs.items()}
    print(f"robust of {N} at Linf {EPS}: {found}")
    assert abs(found["wrapper"] - found["pyautoattack"]) <= 2  # the same seed: in practice the same images
    assert found["wrapper"] <= found["torchattacks"]
    assert 0 < found["wrapper"] < robust(model, x, y)  # an informative budget: some fooled, some not


@pytest.mark.slow
def test_autoattack_returns_inputs_within_eps(digits, runs):
    _, x, _ = digits
    adversarial = runs["wrapper"]
    assert isinstance(adversarial, torch.Tensor) and adversarial.shape == x.shape and adversarial.dtype == x.dtype
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - x).abs().max() <= EPS + 1e-6
    assert not torch.equal(adversarial, x)


@pytest.mark.slow
def test_autoattack_is_seeded(digits):
    model, x, y = digits
    build = get_attack("autoattack").build

    def run(seed: int) -> torch.Tensor:  # APGD-CE alone, whose random start the seed sets (at L2, where
        # the steps follow the gradient's direction; at Linf its sign steps end on the same corners)
        return build(model, norm="L2", eps=0.5, version="custom", attacks="apgd-ce", seed=seed)(x, y)

    first = run(1)
    assert torch.equal(first, run(1)) and not torch.equal(first, run(2))


def test_autoattack_replaces_torchattacks_and_keeps_its_keywords():
    entry = get_attack("autoattack")
    assert entry.factory is AutoAttack and ATTACKS["autoattack"] is entry
    assert {"norm", "eps", "version", "n_classes", "seed"} <= set(entry.keywords)
    assert "autoattack" not in NOT_PROBED


@pytest.mark.parametrize(("params", "message"), [
    ({"norm": "Linf2"}, "norm must be one of Linf, L2, L1; got 'Linf2'"),
    ({"norm": "linf"}, "norm must be one of"),
    ({"version": "nope"}, "version must be one of standard, plus, rand, custom; got 'nope'"),
    ({"version": "fast"}, "version must be one of"),
    ({"eps": -1}, "eps must be a finite number above 0; got -1"),
    ({"eps": 0}, "eps must be a finite number above 0"),
    ({"eps": float("nan")}, "eps must be a finite number above 0"),
    ({"n_classes": 1}, "n_classes must be a whole number of at least 2"),
    ({"n_classes": 3}, r"apgd-t \(version 'standard'\) needs a model with at least 4 classes; got n_classes=3"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"verbose": "yes"}, "verbose must be true or false"),
    ({"attacks": "apgd-ce"}, "attacks is for version 'custom' only"),
    ({"version": "custom"}, "version 'custom' needs attacks"),
    ({"version": "custom", "attacks": "apgd-ce,apgd-x"}, "attacks must name one or more of apgd-ce, "),
    ({"version": "custom", "attacks": "square,square"}, "attacks names an attack twice"),
])
def test_bad_keywords_are_refused_at_construction(digits, params, message):
    model, _, _ = digits
    with pytest.raises(ValueError, match=message):
        get_attack("autoattack").build(model, **params)


def test_preflight_refuses_bad_values_and_runs_good_ones_on_a_tiny_budget(digits):
    model, x, y = digits
    for norm in ("Linf2", "L3"):
        cells = parse_suite(f'[[attack]]\nname = "autoattack"\nnorm = "{norm}"\neps = [0.1]', "t", "t.toml").cells()
        with pytest.raises(UsageError,
                           match=f"attack .* cannot run with .*: norm must be one of Linf, L2, L1; got '{norm}'"):
            probe_attacks(model, cells, x[:1], y[:1], num_classes=10, seed=0)
    # a class count the model does not have passes the keyword checks, and fails in the trial run, not mid-audit
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    cells = parse_suite('[[attack]]\nname = "autoattack"\nn_classes = 10\neps = [1e-4]', "t", "t.toml").cells()
    with torch.no_grad():
        labels = three(x[:1]).argmax(1)  # classified right, and too far from the boundary for APGD-CE to fool
    with pytest.raises(UsageError, match="attack autoattack.* cannot run with"):
        probe_attacks(three, cells, x[:1], labels, num_classes=3, seed=0)
    # the shipped suite (Linf and L2, 'standard') runs, every attack of it once, in well under a second
    started = time.perf_counter()
    probe_attacks(model, load_suite("autoattack").cells(), x[:2], y[:2], num_classes=10, seed=0)
    assert time.perf_counter() - started < 5
