"""Orthogonal PGD, the adaptive attack on a classifier and a detector, registered as ``orthogonal_pgd``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchattacks.attack import Attack
from torch import nn

from advdetect.attacks import register_attack

#: Maps inputs to detector scores [N] (higher: more likely adversarial), differentiably.
DetectorScore = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("orthogonal", "selective", "combined")
NORMS = ("Linf", "L2")


class OrthogonalPGD(Attack):
    r"""Orthogonal projected gradient descent: Bryniarski, Hingun, Pachuca, Wang and Carlini, "Evading
    Adversarial Example Detection Defenses with Orthogonal Projected Gradient Descent", ICLR 2022,
    arXiv 2106.15023 (their code: v-wangg/OrthogonalPGD, ``attack.py``).

    The attacker wants an input that is misclassified *and* scored below the detector's threshold.
    ``method`` picks how each step combines the classifier's cross-entropy gradient ``g_c`` (to raise)
    with the detector score's gradient ``g_d`` (to lower):

    - ``orthogonal`` (the paper's): while an input is still classified correctly, step on ``g_c`` with
      its component along ``g_d`` removed, so the step does not raise the score; once misclassified
      (with a logit margin of ``margin``), step on ``-g_d`` with its component along ``g_c`` removed,
      so lowering the score does not undo the misclassification;
    - ``selective`` (the paper's selective loss gradient descent): the cross-entropy gradient only for
      inputs still classified correctly, plus the score gradient only for inputs still flagged
      (score at or above ``threshold``);
    - ``combined``: ``g_c - lam * g_d``, the plain weighted sum (Carlini and Wagner 2017).

    Steps are signed (``Linf``) or L2-normalized (``L2``) and projected onto the ``eps`` ball and
    [0, 1], as torchattacks' PGD and PGDL2. Per input it returns the iterate that was misclassified
    with the lowest detector score, or the last iterate when none was misclassified. With no
    ``score`` it is torchattacks' PGD (``Linf``) or PGDL2 (``L2``), bit for bit.

    :meth:`forward` takes an optional ``start`` per input (an oblivious attack's example, where it
    fooled the model): the search begins there instead of at a random point, and since the start is
    judged like every iterate the attack never does worse than it. Without it, a detector whose
    gradient points against the classifier's (a confidence score) stalls the first phase: the
    classifier gradient with that component removed is almost nothing.
    """

    real_valued = frozenset({"lam"})
    budgets = {"steps": 1}

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 norm: str = "Linf", random_start: bool = True, method: str = "orthogonal", lam: float = 1.0,
                 margin: float = 0.05, score: DetectorScore | None = None, threshold: float | None = None) -> None:
        super().__init__("OrthogonalPGD", model)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if method == "selective" and score is not None and threshold is None:
            raise ValueError("the selective method needs the detector's threshold")
        self.eps, self.alpha, self.steps, self.norm = eps, alpha, steps, norm
        self.random_start, self.method, self.lam, self.margin = random_start, method, lam, margin
        self.score, self.threshold = score, threshold
        self.supported_mode = ["default"]

    def _start(self, images: torch.Tensor) -> torch.Tensor:
        adv = images.clone().detach()
        if not self.random_start:
            return adv
        if self.norm == "Linf":
            adv = adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)
        else:  # torchattacks' PGDL2: a random direction, a uniform share of the radius
            delta = torch.empty_like(adv).normal_()
            n = delta.view(len(adv), -1).norm(p=2, dim=1).view(len(adv), *[1] * (adv.ndim - 1))
            delta *= torch.zeros_like(n).uniform_(0, 1) / n * self.eps
            adv = adv + delta
        return torch.clamp(adv, min=0, max=1).detach()

    def _step(self, adv: torch.Tensor, images: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            adv = adv.detach() + self.alpha * direction.sign()
            delta = torch.clamp(adv - images, min=-self.eps, max=self.eps)
        else:
            norms = torch.norm(direction.view(len(adv), -1), p=2, dim=1) + 1e-10
            adv = adv.detach() + self.alpha * (direction / norms.view(-1, *[1] * (adv.ndim - 1)))
            delta = adv - images
            factor = torch.min(self.eps / torch.norm(delta.view(len(adv), -1), p=2, dim=1),
                               torch.ones(len(adv), device=adv.device))
            delta = delta * factor.view(-1, *[1] * (adv.ndim - 1))
        return torch.clamp(images + delta, min=0, max=1).detach()

    def forward(self, images: torch.Tensor, labels: torch.Tensor, start: torch.Tensor | None = None,
                use_start: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples of ``images``; ``start[i]`` begins the search where ``use_start[i]``
        (each within the budget: it is projected like a step)."""
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        loss = nn.CrossEntropyLoss()
        adv = self._start(images)
        if start is not None and use_start is not None:
            begin = self._step(start.to(self.device), images, torch.zeros_like(images))  # projected onto the ball
            adv = torch.where(use_start.to(self.device).view(-1, *[1] * (adv.ndim - 1)), begin, adv)
        if self.score is None:  # PGD
            for _ in range(self.steps):
                adv.requires_grad = True
                grad = torch.autograd.grad(loss(self.get_logits(adv), labels), adv)[0]
                adv = self._step(adv, images, grad)
            return adv
        best = adv.clone()
        best_score = torch.full((len(adv),), float("inf"), dtype=torch.float64, device=adv.device)
        for step in range(self.steps + 1):
            adv.requires_grad = True
            scores, logits = self._scores_and_logits(adv)
            fooled = logits.detach().argmax(1) != labels
            better = fooled & (scores.detach().double() < best_score)
            best[better], best_score[better] = adv.detach()[better], scores.detach().double()[better]
            if step == self.steps:  # the last iterate is judged, not moved
                break
            adv = self._step(adv, images, self._gradient(adv, logits, labels, scores))
        return torch.where(torch.isfinite(best_score).view(-1, *[1] * (adv.ndim - 1)), best, adv.detach())

    def _scores_and_logits(self, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The detector's scores of ``adv`` and the classifier's logits. A detector that runs the model
        on ``adv`` itself (the gradient signatures, MSP, Energy) has computed the logits already: they
        are taken from that forward pass, in the graph, so the classifier is neither run nor
        backpropagated through twice."""
        seen: list[torch.Tensor] = []

        def keep(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            # only the model as the attack sees it: in eval mode, on adv itself, in adv's graph
            if args and args[0] is adv and not module.training and output.requires_grad:
                seen.append(output)

        plain = self._normalization_applied is not False  # get_logits would normalize first otherwise
        handle = self.model.register_forward_hook(keep) if plain else None
        try:
            scores = self.score(adv)
        finally:
            if handle is not None:
                handle.remove()
        return scores, (seen[-1] if seen else self.get_logits(adv))

    def _gradient(self, adv: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  scores: torch.Tensor) -> torch.Tensor:
        """This step's direction, from the cross-entropy's gradient ``g_c`` (per input, not averaged)
        and ``g_d``, the gradient that lowers the score. The selective and combined directions are
        per-input weighted sums of the two, and the model treats inputs independently, so one
        backward pass of the weighted sum of the objectives gives them; the orthogonal one needs both."""
        per_input = nn.functional.cross_entropy(logits, labels, reduction="none")
        if self.method == "combined":
            return torch.autograd.grad(per_input.sum() - self.lam * scores.sum(), adv)[0]
        if self.method == "selective":
            correct = (logits.detach().argmax(1) == labels).to(per_input.dtype)
            flagged = (scores.detach() >= self.threshold).to(scores.dtype)
            return torch.autograd.grad((per_input * correct).sum() - (scores * flagged).sum(), adv)[0]
        g_c = torch.autograd.grad(per_input.sum(), adv, retain_graph=True)[0]
        g_d = -torch.autograd.grad(scores.sum(), adv)[0]
        return self._direction(g_c, g_d, logits.detach(), labels)

    def _direction(self, g_c: torch.Tensor, g_d: torch.Tensor, logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        shape = (-1, *[1] * (g_c.ndim - 1))
        # crossed with a margin, as the paper's code: the true logit raised by `margin` still loses
        raised = logits.clone()
        raised[torch.arange(len(labels)), labels] += self.margin
        crossed = (raised.argmax(1) != labels).view(shape)
        return torch.where(crossed, _orthogonal(g_d, g_c), _orthogonal(g_c, g_d))


def _orthogonal(g: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``g`` with its component along ``other`` removed, per input."""
    flat, along = g.flatten(1), other.flatten(1)
    coefficient = (flat * along).sum(1, keepdim=True) / (along.pow(2).sum(1, keepdim=True) + 1e-20)
    return (flat - coefficient * along).view_as(g)


register_attack("orthogonal_pgd", OrthogonalPGD)
