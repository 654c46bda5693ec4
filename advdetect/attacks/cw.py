"""CW-L2 whose ``kappa`` is the confidence it guarantees, registered as ``cw`` in place of torchattacks' own."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn

from advdetect.attacks import register_attack


class CW(torchattacks.CW):
    r"""CW-L2 (Carlini and Wagner, 'Towards Evaluating the Robustness of Neural Networks', IEEE S&P 2017,
    https://arxiv.org/abs/1608.04644): torchattacks' search, with the paper's success criterion.

    This exists because torchattacks' ``CW`` (3.5.1) uses ``kappa`` in its loss only: it keeps, for each
    input, the smallest-L2 iterate that is *misclassified*, whatever its margin, so no ``kappa``
    guarantees the confidence of what it returns. Carlini and Wagner's own
    code keeps an iterate only when it is adversarial with confidence ``kappa`` (for an untargeted attack:
    ``argmax(Z + kappa * onehot(y)) != y``; for a targeted one: ``argmax(Z - kappa * onehot(t)) == t``).
    This class runs torchattacks' search unchanged (same optimizer, steps, loss and early stop) and keeps
    iterates by that criterion, :meth:`is_adversarial`, kept apart from the search. At ``kappa = 0`` the
    criterion is torchattacks' own, and ``tests/test_cw.py`` checks that the images are the same. An input
    the search never takes past the margin comes back unchanged, so it counts as not fooled.

    Arguments:
        model (nn.Module): model to attack.
        c (float): weight of the classification loss against the L2 distance. (Default: 1)
        kappa (float): confidence: the logit margin an adversarial example must have. (Default: 0)
        steps (int): number of Adam steps. (Default: 50)
        lr (float): learning rate of the Adam optimizer. (Default: 0.01)
        abort_early (bool): torchattacks' early stop, on by default: end the search when the batch's
            total cost rose since the last check, a tenth of the steps before. ``false`` runs every
            step, so the smallest adversarial example found can keep shrinking toward the margin.
            (Default: True)
    """

    def __init__(self, model, c=1, kappa=0, steps=50, lr=0.01, abort_early=True):
        super().__init__(model, c=c, kappa=kappa, steps=steps, lr=lr)
        self.abort_early = abort_early

    def is_adversarial(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Whether each input's logits are adversarial for ``labels`` (the targets, in targeted mode)
        with a margin of at least ``kappa``, as 0/1 floats."""
        shift = self.kappa * nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
        if self.targeted:
            return (torch.argmax(logits - shift, 1) == labels).float()
        return (torch.argmax(logits + shift, 1) != labels).float()

    def forward(self, images, labels):
        r"""
        Overridden.
        """
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        goal = self.get_target_label(images, labels) if self.targeted else labels

        w = self.inverse_tanh_space(images).detach()
        w.requires_grad = True
        best_adv_images = images.clone().detach()
        best_L2 = 1e10 * torch.ones((len(images))).to(self.device)
        prev_cost = 1e10
        dim = len(images.shape)
        MSELoss = nn.MSELoss(reduction="none")
        Flatten = nn.Flatten()
        optimizer = torch.optim.Adam([w], lr=self.lr)

        for step in range(self.steps):
            adv_images = self.tanh_space(w)
            current_L2 = MSELoss(Flatten(adv_images), Flatten(images)).sum(dim=1)
            L2_loss = current_L2.sum()
            outputs = self.get_logits(adv_images)
            f_loss = self.f(outputs, goal).sum()
            cost = L2_loss + self.c * f_loss

            optimizer.zero_grad()
            cost.backward()
            optimizer.step()

            # keep the smallest-L2 iterate of each input that is adversarial with confidence kappa
            mask = self.is_adversarial(outputs.detach(), goal) * (best_L2 > current_L2.detach())
            best_L2 = mask * current_L2.detach() + (1 - mask) * best_L2
            mask = mask.view([-1] + [1] * (dim - 1))
            best_adv_images = mask * adv_images.detach() + (1 - mask) * best_adv_images

            # torchattacks' early stop: the batch's cost rose since the last check, a tenth of the steps before
            if self.abort_early and step % max(self.steps // 10, 1) == 0:
                if cost.item() > prev_cost:
                    return best_adv_images
                prev_cost = cost.item()

        return best_adv_images


register_attack("CW", CW, replaces=True)
