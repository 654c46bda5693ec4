"""Per-input early exits: an input leaves the attacked batch once its attack is done, and nothing it
would get changes. Pinned by the pass counter (:mod:`advdetect.signatures.passes`): the batch makes
the passes its inputs would make alone, no more."""

import pytest
import torch
from torch import nn

from helpers import inputs_labelled_by, small_mlp

from advdetect.attacks.autoattack import AutoAttack
from advdetect.attacks.cw import CW
from advdetect.attacks.deepfool import DeepFool
from advdetect.signatures.passes import PassCounter

N_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return small_mlp(24, N_CLASSES)


@pytest.fixture(scope="module")
def data(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs_labelled_by(model, 24, 24)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def each_alone(model, attack, x, y) -> tuple[torch.Tensor, int, int]:
    """The attack on every input alone, in a batch of one: the images, and the passes all of them made."""
    with PassCounter(model) as passes:
        images = torch.cat([attack(x[i : i + 1], y[i : i + 1]) for i in range(len(x))])
    return images, passes.forward, passes.backward


def test_deepfool_drops_fooled_inputs_and_gives_each_the_image_it_gets_alone(model, data):
    x, y = data
    attack = DeepFool(model, steps=10, overshoot=0.02)
    with PassCounter(model) as passes:
        images = attack(x, y)
    alone, _, alone_backward = each_alone(model, attack, x, y)
    torch.testing.assert_close(images, alone, rtol=0, atol=1e-5)
    assert torch.equal(predict(model, images) != y, predict(model, alone) != y)
    # no gradient is taken for an input once it is fooled: the batch's backward passes are its inputs' alone,
    # far fewer than the (K-1) per input and step it would take without the exit
    assert passes.backward == alone_backward < len(x) * 10 * (N_CLASSES - 1)
    assert (predict(model, images) != y).all()


@pytest.mark.parametrize("c", [0.5, 5.0])
def test_cw_per_input_stop_gives_each_input_its_image_alone_and_no_more_passes(model, data, c):
    """With ``per_input``, each input leaves the batch when its own cost rose, as torchattacks' early stop
    ends a batch of one: every input comes back as it does attacked alone, with the passes it makes alone."""
    x, y = data
    with PassCounter(model) as passes:
        images = CW(model, c=c, steps=40, lr=0.05, per_input=True)(x, y)
    alone, alone_forward, alone_backward = each_alone(model, CW(model, c=c, steps=40, lr=0.05), x, y)
    torch.testing.assert_close(images, alone, rtol=0, atol=1e-5)
    fooled = predict(model, images) != y
    assert torch.equal(fooled, predict(model, alone) != y) and fooled.any()
    assert (passes.forward, passes.backward) == (alone_forward, alone_backward)
    with PassCounter(model) as batch_passes:  # today's batch-level stop runs every input as long as the batch
        CW(model, c=c, steps=40, lr=0.05)(x, y)
    assert batch_passes.forward % len(x) == 0 and passes.forward != batch_passes.forward


def test_cw_stops_per_input_only_when_asked_and_only_with_abort_early(model, data):
    x, y = data
    with PassCounter(model) as passes:
        CW(model, c=5.0, steps=40, lr=0.05, abort_early=False, per_input=True)(x, y)
    assert passes.forward == passes.backward == len(x) * 40


def test_cw_takes_no_weight_gradients(model, data):
    """Only the gradient to the attacked inputs: the model's weights get no ``.grad`` (torchattacks' do)."""
    x, y = data
    model.zero_grad(set_to_none=True)
    CW(model, c=5.0, steps=3)(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_autoattack_runs_each_later_attack_only_on_the_inputs_still_robust(model, data):
    """The reference (pyautoattack's ``run_standard_evaluation``) hands each attack after the first only
    the inputs no earlier attack fooled: APGD-DLR sees exactly those APGD-CE left robust."""
    x, y = data
    attack = AutoAttack(model, norm="Linf", eps=0.03, version="custom", attacks=["apgd-ce", "apgd-dlr"],
                        n_classes=N_CLASSES, seed=0).cut_budget()
    apgd = attack._reference.apgd
    seen = []
    perturb = apgd.perturb

    def recording(inputs, labels, *args, **kwargs):
        adversarial = perturb(inputs, labels, *args, **kwargs)
        seen.append((inputs.clone(), predict(model, adversarial) != labels))
        return adversarial

    apgd.perturb = recording
    attack(x, y)
    (ce_inputs, ce_fooled), (dlr_inputs, _) = seen
    assert torch.equal(ce_inputs, x) and 0 < ce_fooled.sum() < len(x)
    assert torch.equal(dlr_inputs, x[~ce_fooled])
