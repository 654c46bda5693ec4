"""DeepFool on a whole batch at once, registered as ``deepfool`` in place of torchattacks' own."""

from __future__ import annotations

import torch
import torchattacks

from advdetect.attacks import register_attack


class DeepFool(torchattacks.attack.Attack):
    r"""DeepFool (Moosavi-Dezfooli, Fawzi and Frossard, 'DeepFool: a simple and accurate method to fool
    deep neural networks', CVPR 2016, https://arxiv.org/abs/1511.04599), L2, computed on a whole batch.

    This exists because torchattacks' ``DeepFool`` (3.5.1) loops over the images one at a time, building
    each image's Jacobian with one backward pass per class at batch size 1: about 0.7 s per image per step
    for a CIFAR-10 ResNet-18 on a CPU. This class runs the same algorithm, step for step, on all the inputs
    still classified as their label at once: K - 1 backward passes over that batch per step, one per
    ``f_k - f_0``, for the input gradient only (the inputs are independent, the attack running the model in
    eval mode). Each input leaves the batch as soon as it is fooled, or as soon as a step leaves it exactly
    as it was (a fixed point, which torchattacks would go on stepping to the same result). Unlike
    torchattacks' it leaves the ``.grad`` of the model's parameters alone. ``tests/test_deepfool.py``
    checks it against torchattacks: the same adversarial images within float tolerance, the same target
    classes. The predictions on them can differ where an input ends on a logit tie to rounding, which
    batching changes.

    What it copies from torchattacks: each step takes the closest wrong class by
    ``|f_k - f_0| / ||w_k - w_0||``, moves by ``(1 + overshoot) * delta`` (the overshoot applies to each
    step, not to an accumulated perturbation) and clamps to [0, 1]; an input stops at the first step that
    finds it classified otherwise than as its label, so an input misclassified from the start comes back
    unchanged, and one still classified as its label after ``steps`` steps comes back as its last step left it.

    Arguments:
        model (nn.Module): model to attack.
        steps (int): number of steps. (Default: 50)
        overshoot (float): parameter for enhancing the noise. (Default: 0.02)
    Shape:
        - images: :math:`(N, C, H, W)`, in the range [0, 1].
        - labels: :math:`(N)`.
        - output: :math:`(N, C, H, W)`.
    """

    budgets = {"steps": 1}

    def __init__(self, model, steps=50, overshoot=0.02):
        super().__init__("DeepFool", model)
        self.steps = steps
        self.overshoot = overshoot
        self.supported_mode = ["default"]

    def forward(self, images, labels):
        r"""
        Overridden.
        """
        adv_images, _ = self.forward_return_target_labels(images, labels)
        return adv_images

    def forward_return_target_labels(self, images, labels):
        r"""The adversarial images, and for each input the class it was last found in (when fooled) or
        last stepped towards, as torchattacks' ``DeepFool.forward_return_target_labels`` returns them."""
        adv_images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        target_labels = labels.clone()
        active = torch.arange(len(adv_images), device=self.device)  # the inputs still classified as their label
        curr_steps = 0
        while len(active) and curr_steps < self.steps:
            image = adv_images[active].requires_grad_(True)
            fs = self.get_logits(image)
            _, pre = torch.max(fs, dim=1)
            fooled = pre != labels[active]
            if fooled.any():
                target_labels[active[fooled]] = pre[fooled]
                active = active[~fooled]
                if not len(active):
                    break
                image = adv_images[active].requires_grad_(True)  # no backward pass for the fooled ones
                fs = self.get_logits(image)
            label = labels[active]
            rows = torch.arange(len(active), device=self.device)
            n_classes = fs.shape[1]
            wrong = torch.arange(n_classes, device=self.device).expand(len(active), -1)
            wrong = wrong[wrong != label[:, None]].view(len(active), n_classes - 1)  # (N, K-1): the other classes
            w_prime = self._gradient_differences(fs, image, wrong, label)  # (N, K-1, C, H, W): w_k - w_0
            fs = fs.detach()
            f_prime = fs.gather(1, wrong) - fs[rows, label][:, None]  # (N, K-1): f_k - f_0
            value = torch.abs(f_prime) / torch.norm(w_prime.flatten(2), p=2, dim=2)
            _, hat_L = torch.min(value, dim=1)

            f_hat = f_prime[rows, hat_L]
            w_hat = w_prime[rows, hat_L]
            norm = torch.norm(w_hat.flatten(1), p=2, dim=1)
            per_input = (-1, *[1] * (w_hat.dim() - 1))  # broadcasts one number per input over its image
            delta = torch.abs(f_hat).view(per_input) * w_hat / (norm**2).view(per_input)

            target_labels[active] = wrong[rows, hat_L]
            before = adv_images[active]
            after = torch.clamp(before + (1 + self.overshoot) * delta, min=0, max=1)
            adv_images[active] = after
            # An input that its step left exactly as it was (its logit gap rounds to 0 on the decision boundary,
            # or the clamp undoes the whole step) is at a fixed point: the model being deterministic in eval mode,
            # every later step would leave it so too, and torchattacks would return it as it is now.
            active = active[(after != before).flatten(1).any(dim=1)]
            curr_steps += 1

        return adv_images.detach(), target_labels

    @staticmethod
    def _gradient_differences(fs, image, wrong, label):
        """``w_k - w_0`` for every input and every class ``k`` but its label, (N, K-1, *input shape): K-1
        backward passes over the batch, the j-th one of ``f_k - f_0`` for each input's j-th other class
        (each input's gradient depends on its own logits only). torchattacks computes all K gradients
        and subtracts; the result is the same to rounding."""
        to_label = torch.nn.functional.one_hot(label, fs.shape[1]).to(fs.dtype)
        grads = [torch.autograd.grad(fs, image, torch.nn.functional.one_hot(wrong[:, j], fs.shape[1]).to(fs.dtype)
                                     - to_label, retain_graph=j + 1 < wrong.shape[1])[0]
                 for j in range(wrong.shape[1])]
        return torch.stack(grads, dim=1).detach()


register_attack("DeepFool", DeepFool, replaces=True)
