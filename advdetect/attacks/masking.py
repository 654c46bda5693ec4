"""Gradient-masking symptoms: a cheap sanity check of whether a model's robustness to gradient
attacks is real or an artefact of gradients that do not lead anywhere.

A forward that masks its input gradient (input quantisation such as ``round(x * 255) / 255``,
a saturated softmax, shattered or misleading gradients) gets about 0% success from every
gradient attack and reads as robust. Athalye, Carlini and Wagner, "Obfuscated Gradients Give a
False Sense of Security: Circumventing Defenses to Adversarial Examples" (ICML 2018, section 3.1,
"Identifying obfuscated and masked gradients") and Carlini et al., "On Evaluating Adversarial
Robustness" (2019, arXiv:1902.06705, the recommendation "perform basic sanity tests") list the
behaviour of attacks that betrays it. :func:`masking_symptoms` runs those tests on a few correctly
classified inputs and reports, for each, whether it shows:

``vanishing_gradients``
    The input gradient of the cross-entropy loss is zero on more than half of the inputs: a
    gradient attack has no direction to follow (sign(0) = 0), so its failure says nothing about
    robustness. An input's gradient counts as zero when no component of it reaches the smallest
    normal number of its dtype (1.2e-38 in float32): exactly zero, or underflowed to a subnormal
    value that keeps no relative precision. A fixed threshold such as 1e-12 would flag honest,
    confident models, whose cross-entropy gradient is about exp(-margin) (1e-13 at a logit margin
    of 30) yet points the right way, and a threshold relative to the loss is undefined because
    float32 rounds the loss itself to 0 from a margin of about 17 while its gradient is still
    usable. Defensive distillation's saturated softmax (gradients underflow to 0) and input
    quantisation (derivative 0 almost everywhere) are both caught. A NaN gradient counts as zero.
``one_step_beats_iterative``
    FGSM (one step of size eps) fools more inputs than PGD at the same eps. PGD can follow
    FGSM's first step and more, so it should do at least as well; when it does not, the loss
    surface is shattered or misleading near the input and iterating on the local gradient gets
    stuck (Athalye et al. 3.1: "one-step attacks perform better than iterative attacks").
``no_growth_with_budget``
    PGD at 4 * eps (at most 1) fools no more inputs than PGD at eps although PGD at eps did not
    fool them all. A larger budget contains every perturbation of the smaller one, so success
    must grow until it reaches 100% (Athalye et al. 3.1: "increasing distortion bound does not
    increase success").
``gradient_free_beats_gradient``
    A gradient-free attack (torchattacks' Square, a random search over vertices of the eps-ball,
    with :data:`SQUARE_QUERIES` queries, against AutoAttack's 5000) fools more inputs than PGD at
    the same eps: the gradient is less informative than random guesses (Athalye et al. 3.1:
    "black-box attacks are better than white-box attacks"). On honest models such a short Square
    run fools fewer inputs than PGD, so the symptom shows only where PGD is badly off.
``unbounded_attack_fails``
    PGD with eps = 1, where any input in [0, 1] can become any other, fools fewer than 99% of
    the inputs: an attack that works must reach 100% there, so the gradient does not lead to the
    model's other classes (Athalye et al. 3.1: "unbounded attacks do not reach 100% success").
    It starts from the input itself, not from a random point: at eps = 1 a random start is
    uniform noise, far from where the gradient is masked (a saturated softmax, say), and would
    test the noise instead of the gradient at the input.

"Fools more" (symptoms 2 and 4) means by at least :data:`MIN_MARGIN_INPUTS` inputs and
:data:`MIN_MARGIN_FRACTION` of the inputs: both attacks run on the same inputs, and a difference
of one input, or of a few percentage points on a hundred, is within what random starts and
random proposals change from one seed to another.

An observed symptom is a reason to distrust the audit's gradient attacks (and to run adaptive
ones: BPDA, EOT, a margin loss), not proof of masking; no symptom is not proof of robustness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn
from torchattacks.attack import Attack

#: Symptoms 2 and 4: one attack "fools more" than another when it fools at least this many more inputs...
MIN_MARGIN_INPUTS = 2
#: ... and at least this share of the inputs more (5 percentage points).
MIN_MARGIN_FRACTION = 0.05
#: Symptom 3: PGD's second budget, as a multiple of eps (capped at 1, the whole input range).
BUDGET_FACTOR = 4.0
#: Symptom 5: the unbounded attack fails when it fools less than this share of the inputs.
UNBOUNDED_MIN_SUCCESS = 0.99
#: Symptom 5: PGD steps at eps = 1 (step 2.5 / 50 = 0.05, a total path of 2.5, from the input itself).
UNBOUNDED_STEPS = 20
#: Symptom 4: Square's query budget per input (a forward pass each; it stops on fooled inputs).
SQUARE_QUERIES = 100
#: Symptom 1: the share of inputs with a zero gradient above which the symptom shows.
VANISHING_SHARE = 0.5

NAMES = ("vanishing_gradients", "one_step_beats_iterative", "no_growth_with_budget",
         "gradient_free_beats_gradient", "unbounded_attack_fails")


@dataclass(frozen=True)
class Symptom:
    """One sanity test's outcome: its stable ``name`` (one of :data:`NAMES`), whether it showed,
    and one sentence with the numbers it was decided on."""

    name: str
    observed: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def suspected(symptoms: list[Symptom]) -> list[Symptom]:
    """The symptoms that showed."""
    return [s for s in symptoms if s.observed]


def beats(a: int, b: int, n: int) -> bool:
    """Whether ``a`` fooled inputs out of ``n`` is more than ``b`` by a margin that is not noise:
    at least :data:`MIN_MARGIN_INPUTS` inputs and :data:`MIN_MARGIN_FRACTION` of ``n``."""
    return a - b >= max(MIN_MARGIN_INPUTS, math.ceil(MIN_MARGIN_FRACTION * n - 1e-9))


def masking_symptoms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int,
                     batch_size: int = 128, steps: int = 20) -> list[Symptom]:
    """The five gradient-masking symptoms (see the module docstring), each decided on ``x``.

    ``model`` is an eval-mode classifier of inputs in [0, 1], shaped (N, C, H, W) (Square needs
    images); ``x``, ``y`` are inputs it classifies correctly (a ValueError says otherwise), a
    subset of a hundred or so is enough; ``eps`` is the Linf budget of the audit. PGD runs
    ``steps`` steps of 2.5 * eps / steps from a random start. Everything runs on the model's
    device, in batches of ``batch_size``, seeded by ``seed`` (each attack by its own derived seed);
    torch's global RNG state, on the CPU and the model's device, is left as it was. Gradients are
    computed even when the caller runs under ``torch.no_grad()``. Per input it costs
    2 + 2 * steps + UNBOUNDED_STEPS forward-and-backward passes (62 with the defaults) and at most
    SQUARE_QUERIES + 9 forward passes (109).
    """
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images (N, C, H, W); got shape {tuple(x.shape)}")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same, non-zero number of inputs; got {len(x)} and {len(y)}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1]; got {eps}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1; got {steps} and {batch_size}")
    device = _device(model)
    n = len(x)

    def pgd(budget: float, n_steps: int, random_start: bool = True) -> Callable[[], Attack]:
        return lambda: torchattacks.PGD(model, eps=budget, alpha=2.5 * budget / n_steps, steps=n_steps,
                                        random_start=random_start)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        misclassified = _count_fooled(model, x, y, None, batch_size, device, seed)
        if misclassified:
            raise ValueError(f"the model misclassifies {misclassified} of the {n} inputs; "
                             "pass correctly classified ones")
        zero = _count_zero_gradients(model, x, y, batch_size, device)
        fgsm = _count_fooled(model, x, y, lambda: torchattacks.FGSM(model, eps=eps), batch_size, device, seed)
        pgd_eps = _count_fooled(model, x, y, pgd(eps, steps), batch_size, device, seed + 1)
        pgd_larger = _count_fooled(model, x, y, pgd(larger_budget(eps), steps), batch_size, device, seed + 2)
        square = _count_fooled(model, x, y, lambda: torchattacks.Square(
            model, norm="Linf", eps=eps, n_queries=SQUARE_QUERIES, n_restarts=1, seed=seed + 3), batch_size, device,
            seed + 3)
        unbounded = _count_fooled(model, x, y, pgd(1.0, UNBOUNDED_STEPS, random_start=False), batch_size, device,
                                  seed + 4)
    return decide(n=n, eps=eps, steps=steps, zero_gradients=zero, fgsm=fgsm, pgd=pgd_eps, pgd_larger=pgd_larger,
                  gradient_free=square, unbounded=unbounded)


def larger_budget(eps: float) -> float:
    """Symptom 3's second budget: :data:`BUDGET_FACTOR` * ``eps``, at most 1."""
    return min(BUDGET_FACTOR * eps, 1.0)


def decide(*, n: int, eps: float, steps: int, zero_gradients: int, fgsm: int, pgd: int, pgd_larger: int,
           gradient_free: int, unbounded: int) -> list[Symptom]:
    """The decision rules, on counts out of ``n`` inputs: how many have a zero loss gradient, and
    how many each attack fooled (FGSM, PGD and Square at ``eps``, PGD at :func:`larger_budget`
    and at eps = 1)."""

    def share(k: int) -> str:
        return f"{k} of {n} inputs ({k / n:.0%})"

    return [
        Symptom("vanishing_gradients", zero_gradients > VANISHING_SHARE * n,
                f"the input gradient of the loss is zero on {zero_gradients} of {n} inputs"),
        Symptom("one_step_beats_iterative", beats(fgsm, pgd, n),
                f"FGSM at eps={eps:g} fools {share(fgsm)}, PGD ({steps} steps) {share(pgd)}"),
        Symptom("no_growth_with_budget", pgd_larger <= pgd < n,
                f"PGD fools {share(pgd)} at eps={eps:g} and {share(pgd_larger)} at eps={larger_budget(eps):g}"),
        Symptom("gradient_free_beats_gradient", beats(gradient_free, pgd, n),
                f"Square ({SQUARE_QUERIES} queries) at eps={eps:g} fools {share(gradient_free)}, PGD {share(pgd)}"),
        Symptom("unbounded_attack_fails", unbounded < UNBOUNDED_MIN_SUCCESS * n,
                f"PGD at eps=1 ({UNBOUNDED_STEPS} steps from the input) fools {share(unbounded)}; "
                f"a working attack fools at least {UNBOUNDED_MIN_SUCCESS:.0%}"),
    ]


def _device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _count_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  make_attack: Callable[[], Attack] | None, batch_size: int, device: torch.device,
                  seed: int) -> int:
    """How many of ``x`` the attack (a fresh one, seeded ``seed``; None: no attack) makes the model misclassify."""
    torch.manual_seed(seed)
    attack = make_attack() if make_attack is not None else None
    if attack is not None:
        attack.set_device(device)
    fooled = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        adv = attack(xb, yb) if attack is not None else xb
        with torch.no_grad():
            fooled += int((model(adv).argmax(1) != yb).sum())
    return fooled


def _count_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                          device: torch.device) -> int:
    """How many of ``x`` have a zero (or subnormal) input gradient of the cross-entropy loss."""
    zero = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device).clone().requires_grad_(True)
        yb = y[i : i + batch_size].to(device)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb), yb, reduction="sum")  # sum: each input's gradient is its own loss's
            (grad,) = torch.autograd.grad(loss, xb)
        largest = grad.detach().abs().flatten(1).amax(1)
        zero += int((~(largest >= torch.finfo(grad.dtype).tiny)).sum())  # NaN counts as zero: no direction either
    return zero
