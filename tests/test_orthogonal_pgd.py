"""Orthogonal PGD (Bryniarski et al. 2022): PGD without a detector, and an evader of one with it."""

import pytest
import torch
import torchattacks
from torch import nn

from advdetect.attacks import get_attack
from advdetect.attacks.orthogonal_pgd import OrthogonalPGD
from advdetect.run.metrics import threshold_at_fpr


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Low-frequency images in [0, 1]: 2x2 random values upsampled to 8x8."""
    coarse = torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))
    return nn.functional.interpolate(coarse, size=8, mode="bilinear", align_corners=False) * 0.6 + 0.2


def roughness(x: torch.Tensor) -> torch.Tensor:
    """A hand-made differentiable detector: the energy the image loses to a 3x3 blur. PGD's random
    start and steps are rough, the clean images smooth."""
    blur = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return (x - blur).pow(2).flatten(1).sum(1)


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()


@pytest.mark.parametrize("norm, reference, eps, alpha", [("Linf", torchattacks.PGD, 0.1, 0.02),
                                                         ("L2", torchattacks.PGDL2, 0.5, 0.1)])
def test_without_a_detector_it_is_torchattacks_pgd_bit_for_bit(tiny_model, tiny_inputs, norm, reference, eps, alpha):
    labels = tiny_model(tiny_inputs).argmax(1)
    torch.manual_seed(3)
    expected = reference(tiny_model, eps=eps, alpha=alpha, steps=7)(tiny_inputs, labels)
    torch.manual_seed(3)
    got = OrthogonalPGD(tiny_model, eps=eps, alpha=alpha, steps=7, norm=norm)(tiny_inputs, labels)
    assert torch.equal(got, expected)


def test_it_is_registered_and_checks_its_settings(tiny_model):
    assert get_attack("orthogonal_pgd").factory is OrthogonalPGD
    with pytest.raises(ValueError, match="norm must be one of Linf, L2"):
        OrthogonalPGD(tiny_model, norm="L1")
    with pytest.raises(ValueError, match="method must be one of"):
        OrthogonalPGD(tiny_model, method="nope")
    with pytest.raises(ValueError, match="needs the detector's threshold"):
        OrthogonalPGD(tiny_model, method="selective", score=roughness)


@pytest.mark.slow
@pytest.mark.parametrize("norm, eps, method, least", [("Linf", 0.2, "orthogonal", 0.5), ("L2", 1.0, "orthogonal", 0.7),
                                                      ("L2", 1.0, "selective", 0.6), ("L2", 1.0, "combined", 0.3)])
def test_it_evades_a_differentiable_detector_that_catches_pgd(norm, eps, method, least):
    model = linear_model()
    x = smooth_images(64, seed=0)
    y = model(x).argmax(1)
    threshold = threshold_at_fpr(roughness(smooth_images(200, seed=1)).detach().numpy())  # flags 5% of clean
    steps = 60

    def undetected_success(adversarial: torch.Tensor) -> float:
        fooled = model(adversarial).argmax(1) != y
        return float((fooled & (roughness(adversarial) < threshold)).float().mean())

    torch.manual_seed(0)
    oblivious = OrthogonalPGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm)(x, y)
    torch.manual_seed(0)
    adaptive = OrthogonalPGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm, method=method,
                             lam=10.0, score=roughness, threshold=threshold)(x, y)
    size = (adaptive - x).flatten(1).abs().amax(1) if norm == "Linf" else (adaptive - x).flatten(1).norm(dim=1)
    assert size.max() <= eps + 1e-5 and adaptive.min() >= 0 and adaptive.max() <= 1
    assert float((model(oblivious).argmax(1) != y).float().mean()) > 0.9
    assert undetected_success(oblivious) == 0  # the detector catches every example of the attack that ignores it
    assert undetected_success(adaptive) >= least


def test_it_keeps_the_misclassified_iterate_with_the_lowest_score():
    model = linear_model()
    x = smooth_images(32, seed=2)
    y = model(x).argmax(1)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recorded(inputs: torch.Tensor) -> torch.Tensor:
        scores = roughness(inputs)
        seen.append((inputs.detach().clone(), scores.detach().clone()))
        return scores

    torch.manual_seed(0)
    adversarial = OrthogonalPGD(model, eps=0.2, alpha=0.02, steps=15, score=recorded)(x, y)
    best = torch.full((len(x),), float("inf"))
    for inputs, scores in seen:
        fooled = model(inputs).argmax(1) != y
        best = torch.where(fooled & (scores < best), scores, best)
    found = torch.isfinite(best)
    assert found.any()
    torch.testing.assert_close(roughness(adversarial)[found], best[found])


def test_from_the_oblivious_example_it_never_does_worse_than_that_example():
    """A confidence detector's gradient points against the classifier's: without a start the first
    phase stalls; from the oblivious example the attacker only has to make it confident."""
    model = linear_model()
    x = smooth_images(64, seed=3)
    y = model(x).argmax(1)

    def confidence_score(inputs: torch.Tensor) -> torch.Tensor:  # MSP: low confidence is suspect
        return -torch.softmax(model(inputs), 1).max(1).values

    threshold = threshold_at_fpr(confidence_score(smooth_images(200, seed=4)).detach().numpy())
    torch.manual_seed(0)
    oblivious = OrthogonalPGD(model, eps=0.1, alpha=0.025, steps=10)(x, y)
    fooled = model(oblivious).argmax(1) != y

    def undetected(adversarial: torch.Tensor) -> torch.Tensor:
        return (model(adversarial).argmax(1) != y) & (confidence_score(adversarial) < threshold)

    torch.manual_seed(0)
    adaptive = OrthogonalPGD(model, eps=0.1, alpha=0.0025, steps=40, score=confidence_score)(
        x, y, start=oblivious, use_start=fooled)
    assert fooled.float().mean() > 0.5
    assert bool((undetected(adaptive) | ~undetected(oblivious)).all())  # every evasion of the start is kept
    assert undetected(adaptive).float().mean() >= undetected(oblivious).float().mean()
    assert (confidence_score(adaptive)[fooled] <= confidence_score(oblivious)[fooled] + 1e-6).all()


@pytest.mark.parametrize("method", ["selective", "combined"])
def test_one_backward_pass_gives_the_weighted_sum_of_the_two_gradients(tiny_model, tiny_inputs, method):
    """The selective and combined directions come from one backward pass of the weighted objectives;
    they equal the weighted sum of the cross-entropy's and the score's gradients taken apart."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    score = lambda x: torch.softmax(tiny_model(x), 1).amax(1)  # MSP-like: runs the model on x itself
    threshold = float(score(tiny_inputs).detach().median())
    attack = OrthogonalPGD(tiny_model, eps=0.1, alpha=0.01, steps=1, method=method, lam=0.7,
                           score=score, threshold=threshold if method == "selective" else None)
    adv = tiny_inputs.clone().requires_grad_(True)
    calls = []
    handle = tiny_model.register_forward_hook(lambda *_: calls.append(1))
    scores, logits = attack._scores_and_logits(adv)
    handle.remove()
    assert len(calls) == 1 and torch.equal(logits, tiny_model(tiny_inputs))  # the score's own forward pass
    assert logits.grad_fn is not None
    direction = attack._gradient(adv, logits, labels, scores)

    x = tiny_inputs.clone().requires_grad_(True)
    g_c = torch.autograd.grad(nn.functional.cross_entropy(tiny_model(x), labels, reduction="sum"), x)[0]
    g_d = -torch.autograd.grad(score(x).sum(), x)[0]
    if method == "combined":
        expected = g_c + 0.7 * g_d
    else:
        with torch.no_grad():
            correct = (tiny_model(x).argmax(1) == labels).float().view(-1, 1, 1, 1)
            flagged = (score(x) >= threshold).float().view(-1, 1, 1, 1)
        assert 0 < correct.sum() and 0 < flagged.sum() < len(x)
        expected = g_c * correct + g_d * flagged
    torch.testing.assert_close(direction, expected, rtol=1e-5, atol=1e-7)


def test_a_score_that_does_not_run_the_model_on_the_input_gets_the_classifiers_own_logits(tiny_model, tiny_inputs):
    shifted = lambda x: torch.softmax(tiny_model(x + 0.0), 1).amax(1)  # runs the model on a copy only
    attack = OrthogonalPGD(tiny_model, eps=0.1, alpha=0.01, steps=1, score=shifted)
    adv = tiny_inputs.clone().requires_grad_(True)
    calls = []
    handle = tiny_model.register_forward_hook(lambda *_: calls.append(1))
    _, logits = attack._scores_and_logits(adv)
    handle.remove()
    assert len(calls) == 2  # the score's pass on the copy, then the classifier's own
    torch.testing.assert_close(logits, tiny_model(tiny_inputs))
