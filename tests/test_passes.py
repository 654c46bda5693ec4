"""The pass counter counts what the model is asked to do, and the attack stage records it per cell."""

import json

import pytest
import torch
import torchattacks
from torch import nn

from advdetect.attacks.deepfool import DeepFool
from advdetect.cli.commands import main
from advdetect.cli.scaling import cell_floors, format_report
from advdetect.signatures.passes import PassCost, PassCounter, measure_pass_cost
from helpers import TINY_SUITE


@pytest.mark.parametrize("steps", [1, 4])
def test_pgd_with_k_steps_on_n_inputs_makes_n_times_k_forward_and_backward_passes(tiny_model, tiny_inputs, steps):
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with PassCounter(tiny_model) as passes:
        torchattacks.PGD(tiny_model, eps=0.1, alpha=0.05, steps=steps)(tiny_inputs, labels)
    assert (passes.forward, passes.backward) == (6 * steps, 6 * steps)


def test_a_forward_pass_without_backward_counts_no_backward(tiny_model, tiny_inputs):
    with PassCounter(tiny_model) as passes:
        with torch.no_grad():
            tiny_model(tiny_inputs)
        tiny_model(tiny_inputs.clone().requires_grad_(True))  # a graph, but no gradient taken through it
    assert (passes.forward, passes.backward) == (12, 0)


def test_each_gradient_taken_through_one_forward_pass_counts(tiny_model, tiny_inputs):
    """DeepFool takes K-1 gradients of one forward pass: K-1 backward passes per input."""
    image = tiny_inputs.clone().requires_grad_(True)
    with PassCounter(tiny_model) as passes:
        logits = tiny_model(image)
        for k in range(3):
            torch.autograd.grad(logits[:, k].sum(), image, retain_graph=True)
    assert (passes.forward, passes.backward) == (6, 3 * 6)


def test_the_counter_counts_only_while_entered_and_adds_up_over_entries(tiny_model, tiny_inputs):
    counter = PassCounter(tiny_model)
    with counter:
        tiny_model(tiny_inputs[:2])
    tiny_model(tiny_inputs)  # not counted
    with counter:
        tiny_model(tiny_inputs[:3]).sum().backward()
    assert (counter.forward, counter.backward) == (5, 3)
    assert not tiny_model._forward_hooks


def test_a_model_returning_a_tuple_is_counted_by_its_first_tensor(tiny_inputs):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 3)

        def forward(self, x):
            logits = self.linear(x.flatten(1))
            return logits, logits.detach()

    model = Pair()
    with PassCounter(model) as passes:
        model(tiny_inputs)[0].sum().backward()
    assert (passes.forward, passes.backward) == (6, 6)


def test_deepfool_counts_one_forward_and_k_minus_1_backward_passes_per_active_input_and_step(tiny_model, tiny_inputs):
    with torch.no_grad():
        labels = tiny_model(tiny_inputs).argmax(1)
    with PassCounter(tiny_model) as passes:
        DeepFool(tiny_model, steps=1, overshoot=0.02)(tiny_inputs, labels)  # one step: none fooled at its start
    assert (passes.forward, passes.backward) == (6, 6 * 2)


def test_the_floor_charges_forward_and_backward_passes_at_their_cost():
    cost = PassCost(batch_size=8, forward=1.0, forward_backward=3.0)
    assert cost.backward == 2.0
    assert cost.floor(10, 10) == 10 * 3.0  # one backward per forward: passes x forward+backward
    assert cost.floor(4, 0) == 4.0
    cells = cell_floors([{"key": "pgd[eps=0.1]", "seconds": 60.0, "forward_passes": 10, "backward_passes": 10},
                         {"key": "ood[x]", "seconds": 1.0, "forward_passes": None, "backward_passes": None}], cost)
    assert cells["pgd[eps=0.1]"]["floor_ratio"] == 2.0 and cells["ood[x]"]["floor_ratio"] is None


def test_the_pass_cost_is_measured_per_input(tiny_model, tiny_inputs):
    cost = measure_pass_cost(tiny_model, tiny_inputs, repeats=2)
    assert cost.batch_size == 6 and 0 < cost.forward and 0 < cost.forward_backward


@pytest.mark.slow
def test_the_attack_stage_records_each_cells_passes_and_bench_audit_its_floor(tmp_path, capsys):
    """PGD with 3 steps makes 3 forward and backward passes per attacked input, FGSM one, and each cell one
    forward pass more to classify its adversarial inputs."""
    (tmp_path / "tiny.toml").write_text(TINY_SUITE)
    assert main(["bench", "--audit", str(tmp_path / "tiny.toml"), "--sizes", "30", "--n-reference", "40",
                 "--detectors", "msp", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    run = report["runs"][0]
    n = run["attacked"]
    assert set(run["cells"]) == {"fgsm[eps=0.1]", "fgsm[eps=0.3]", "pgd[eps=0.3]"}
    passes = {key: (cell["forward_passes"], cell["backward_passes"]) for key, cell in run["cells"].items()}
    assert passes == {"fgsm[eps=0.1]": (2 * n, n), "fgsm[eps=0.3]": (2 * n, n), "pgd[eps=0.3]": (4 * n, 3 * n)}
    cost = run["pass_cost"]
    for cell in run["cells"].values():
        floor = cell["forward_passes"] * cost["forward"] + cell["backward_passes"] * cost["backward"]
        assert cell["floor_seconds"] == pytest.approx(floor) and cell["floor_ratio"] == pytest.approx(
            cell["seconds"] / floor)
    # MSP makes one forward pass per clean input and per fooling adversarial input of each cell, and no
    # backward pass
    msp = run["detector_floors"]["msp"]
    assert n < msp["forward_passes"] <= 4 * n and msp["backward_passes"] == 0
    assert msp["floor_seconds"] == pytest.approx(msp["forward_passes"] * cost["forward"])
    table = format_report(report).splitlines()
    assert next(line.split() for line in table if line.startswith("msp"))[1:3] == [str(msp["forward_passes"]), "0"]
    row = next(line.split() for line in table if line.startswith("pgd[eps=0.3]"))
    assert row[1:3] == [str(4 * n), str(3 * n)] and float(row[-1]) == pytest.approx(
        run["cells"]["pgd[eps=0.3]"]["floor_ratio"], abs=0.01)


def test_the_detect_stage_charges_each_detector_its_seconds_and_passes(tiny_model, tiny_inputs):
    from advdetect.stages.detect import Spent

    spent = Spent(tiny_model)
    with spent.on("a"):
        with torch.no_grad():
            tiny_model(tiny_inputs)
    with spent.on("b"):
        x = tiny_inputs.clone().requires_grad_(True)
        torch.autograd.grad(tiny_model(x).sum(), x)
    with spent.on("a"):
        tiny_model(tiny_inputs[:2])
    assert spent.passes == {"a": {"forward": 8, "backward": 0}, "b": {"forward": 6, "backward": 6}}
    assert set(spent.seconds) == {"a", "b"} and all(s > 0 for s in spent.seconds.values())


def test_a_gradient_from_an_inner_layer_to_the_input_counts(tiny_model, tiny_inputs):
    """Mahalanobis takes one input gradient per layer it reads, from that layer, not from the logits."""
    inner = []
    tiny_model.bn.register_forward_hook(lambda module, args, out: inner.append(out))  # an inner layer
    image = tiny_inputs.clone().requires_grad_(True)
    with PassCounter(tiny_model) as passes:
        logits = tiny_model(image)
        torch.autograd.grad(inner[-1].square().sum(), image, retain_graph=True)
        torch.autograd.grad(logits.sum(), image)
    assert (passes.forward, passes.backward) == (6, 2 * 6)


def test_an_input_passed_twice_counts_each_gradient_that_reaches_it_once(tiny_model, tiny_inputs):
    image = tiny_inputs.clone().requires_grad_(True)
    with PassCounter(tiny_model) as passes:
        torch.autograd.grad(tiny_model(image).sum() + tiny_model(image).sum(), image)
    assert (passes.forward, passes.backward) == (12, 6)


def test_parameter_gradients_of_an_input_without_a_graph_count_at_the_output(tiny_model, tiny_inputs):
    with PassCounter(tiny_model) as passes:
        torch.autograd.grad(tiny_model(tiny_inputs).sum(), list(tiny_model.parameters()))
    assert (passes.forward, passes.backward) == (6, 6)


def test_gradients_after_the_block_are_not_counted(tiny_model, tiny_inputs):
    image = tiny_inputs.clone().requires_grad_(True)
    with PassCounter(tiny_model) as passes:
        logits = tiny_model(image)
    torch.autograd.grad(logits.sum(), image)
    assert (passes.forward, passes.backward) == (6, 0)
