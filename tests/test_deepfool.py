"""The batched DeepFool against torchattacks' own, image for image."""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from advdetect.stages import attack as attack_stage
from advdetect.attacks import ATTACKS, get_attack, register_attack
from advdetect.attacks.deepfool import DeepFool
from advdetect.config.suite import parse_suite

N_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(26)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, N_CLASSES)).eval()


@pytest.fixture(scope="module")
def data(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """24 inputs; every sixth one is given a label the model does not predict, so is misclassified from the start."""
    x = 0.2 + 0.6 * torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::6] = (y[::6] + 1) % N_CLASSES
    return x, y


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def both(model, x, y, **params):
    """torchattacks' adversarial images and target labels, then ours."""
    return (torchattacks.DeepFool(model, **params).forward_return_target_labels(x, y),
            DeepFool(model, **params).forward_return_target_labels(x, y))


@pytest.mark.parametrize("steps, overshoot", [(1, 0.02), (2, 0.02), (50, 0.02), (50, 0.3)])
def test_the_same_adversarial_images_as_torchattacks(model, data, steps, overshoot):
    x, y = data
    (theirs, their_targets), (ours, our_targets) = both(model, x, y, steps=steps, overshoot=overshoot)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert torch.equal(predict(model, ours), predict(model, theirs))
    assert torch.equal(our_targets, their_targets)
    assert torch.equal(DeepFool(model, steps=steps, overshoot=overshoot)(x, y), ours)  # forward: the images
    misclassified = predict(model, x) != y
    assert misclassified.sum() == 4 and torch.equal(ours[misclassified], x[misclassified])  # returned unchanged
    assert (ours[~misclassified] != x[~misclassified]).flatten(1).any(1).all()  # every other one took a step
    assert ours.min() >= 0 and ours.max() <= 1


def test_inputs_needing_several_steps_take_them_and_stop_once_fooled(model, data):
    x, y = data
    fooled_by = {steps: predict(model, both(model, x, y, steps=steps)[1][0]) != y for steps in (1, 2, 3, 4, 50)}
    assert [int(f.sum()) for f in fooled_by.values()] == [12, 20, 23, 24, 24]  # some need 3 or 4 steps
    (theirs, _), (ours, _) = both(model, x, y, steps=50)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (theirs == 0).any() or (theirs == 1).any()  # the clamp to [0, 1] mattered
    four = DeepFool(model, steps=4)(x, y)
    assert torch.equal(four, ours)  # no input stepped on after it was fooled


def test_an_input_its_step_leaves_unchanged_is_dropped_from_the_batch():
    """Clamped steps fall short of the decision boundary, ever closer, until the logit gap rounds to 0 and a
    step changes nothing: torchattacks then repeats that no-op step to the end, we stop computing it."""
    with torch.random.fork_rng():
        torch.manual_seed(8)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, N_CLASSES)).eval()
    x = 0.2 + 0.6 * torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    y = predict(model, x)
    (theirs, their_targets), (ours, our_targets) = both(model, x, y, steps=50)
    # a fixed point for torchattacks too, to a float32 ulp (on some CPUs one input settles after step 25)
    torch.testing.assert_close(torchattacks.DeepFool(model, steps=25)(x, y), theirs, atol=1e-7, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert torch.equal(our_targets, their_targets)
    # Not the predictions: on a logit tie the class comes down to rounding, which batching changes.
    batches = []
    counted = DeepFool(model, steps=50)
    counted.get_logits = lambda inputs: batches.append(len(inputs)) or model(inputs)
    assert torch.equal(counted(x, y), ours)
    assert len(batches) < 30 and batches[-1] == 1


def test_a_batch_with_no_input_left_to_attack(model, data):
    x, y = data
    wrong = (predict(model, x) + 1) % N_CLASSES
    assert torch.equal(DeepFool(model)(x, wrong), x)
    assert DeepFool(model)(x[:0], y[:0]).shape == (0, 1, 8, 8)


def test_the_registry_runs_the_batched_deepfool_with_torchattacks_defaults():
    entry = get_attack("deepfool")
    assert entry.factory is DeepFool and ATTACKS["deepfool"] is entry
    theirs = list(inspect.signature(torchattacks.DeepFool.__init__).parameters.values())[2:]  # less self, model
    assert entry.defaults() == {p.name: p.default for p in theirs} == {"steps": 50, "overshoot": 0.02}
    with pytest.raises(ValueError, match="registered twice"):
        register_attack("DeepFool", DeepFool)
    with pytest.raises(ValueError, match="replaces no registered attack"):
        register_attack("nosuchattack", DeepFool, replaces=True)
    assert "nosuchattack" not in ATTACKS


def test_the_attack_cache_key_names_the_implementation(monkeypatch, tmp_path, model):
    """Adversarial inputs cached from torchattacks' DeepFool must not be served for this one."""
    keys = []

    class Stop(Exception):
        pass

    class RecordingCache:
        def __init__(self, root):
            pass

        def key(self, **parts):
            keys.append(parts)
            return "key"

        fingerprint = staticmethod(lambda model, x, y: "f")
        budget = staticmethod(lambda name, params: None)

        def load(self, key, like, budget=None):
            raise Stop

    info = SimpleNamespace(cache_dir=str(tmp_path), seed=0, batch_size=4, model={"sha256": "m", "num_classes": 4})
    sample = {"x": np.zeros((2, 1, 8, 8), np.float32), "y": np.zeros(2, np.int64), "pred": np.zeros(2, np.int64),
              "logits": np.zeros((2, 4), np.float32)}
    monkeypatch.setattr(attack_stage, "read_run", lambda run_dir: info)
    monkeypatch.setattr(attack_stage, "sample_arrays", lambda run_dir: sample)
    monkeypatch.setattr(attack_stage, "AttackCache", RecordingCache)
    cells = parse_suite('[[attack]]\nname = "deepfool"\novershoot = [0.02]\nsteps = 2', "t", "t.toml").cells()
    with pytest.raises(Stop):
        attack_stage.attack_stage(tmp_path, model, cells)
    assert keys[0]["implementation"] == "advdetect.attacks.deepfool.DeepFool"
