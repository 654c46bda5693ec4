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
    the search never takes past the margin comes back unchanged, so it counts as not fooled. Each step
    takes the gradient to the attacked inputs only, where torchattacks' ``cost.backward()`` also computes
    the model weights' gradients and leaves them in their ``.grad``: the same steps, for less work.

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
        per_input (bool): with ``abort_early``, stop each input's search on its own cost instead of the
            batch's: an input leaves the batch (and the model makes no more passes for it) at the first
            check that finds its own cost risen; the others go on. Each input then comes back as if it
            had been attacked alone (a batch of one, where torchattacks' early stop is per input), so its
            result no longer depends on which inputs share its batch, and no input runs on after its own
            search has settled. Off by default, since it changes the images torchattacks' batch-level stop
            gives: an input can stop earlier than its batch would, or search on after the batch would have
            stopped. (Default: False)
    """

    real_valued = frozenset({"c", "kappa"})
    budgets = {"steps": 1}

    def __init__(self, model, c=1, kappa=0, steps=50, lr=0.01, abort_early=True, per_input=False):
        super().__init__(model, c=c, kappa=kappa, steps=steps, lr=lr)
        self.abort_early = abort_early
        self.per_input = per_input

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
        best_L2 = 1e10 * torch.ones(len(images)).to(self.device)
        prev_cost = 1e10
        dim = len(images.shape)
        MSELoss = nn.MSELoss(reduction="none")
        Flatten = nn.Flatten()
        optimizer = torch.optim.Adam([w], lr=self.lr)
        # the inputs still searched, and with per_input the cost of each at its last check. Adam's update is
        # elementwise and its step count shared, so an input's w moves the same whatever else is in the batch;
        # the rows of the inputs that left get a zero gradient and are no longer read.
        active = torch.arange(len(images), device=self.device)
        prev_costs = torch.full((len(images),), 1e10, dtype=torch.float64, device=self.device)  # as cost.item()
        check_every = max(self.steps // 10, 1)

        for step in range(self.steps):
            adv_images = self.tanh_space(w[active])
            current_L2 = MSELoss(Flatten(adv_images), Flatten(images[active])).sum(dim=1)
            L2_loss = current_L2.sum()
            outputs = self.get_logits(adv_images)
            f = self.f(outputs, goal[active])
            cost = L2_loss + self.c * f.sum()

            # the gradient to w only: torchattacks' cost.backward() also computes (and leaves behind) the
            # gradients of the model's weights, a second backward pass's worth of work that no step reads
            (w.grad,) = torch.autograd.grad(cost, [w])
            optimizer.step()

            # keep the smallest-L2 iterate of each input that is adversarial with confidence kappa
            mask = self.is_adversarial(outputs.detach(), goal[active]) * (best_L2[active] > current_L2.detach())
            best_L2[active] = mask * current_L2.detach() + (1 - mask) * best_L2[active]
            mask = mask.view([-1] + [1] * (dim - 1))
            best_adv_images[active] = mask * adv_images.detach() + (1 - mask) * best_adv_images[active]

            if not self.abort_early or step % check_every:
                continue
            if self.per_input:  # each input's own cost rose since its last check, a tenth of the steps before
                costs = (current_L2 + self.c * f).detach().double()
                rose = costs > prev_costs[active]
                prev_costs[active] = costs
                active = active[~rose]
                if not len(active):
                    break
            else:  # torchattacks' early stop: the batch's cost rose since the last check
                if cost.item() > prev_cost:
                    break
                prev_cost = cost.item()

        return best_adv_images


register_attack("CW", CW, replaces=True)
