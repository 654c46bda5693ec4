import json
from pathlib import Path

#: Two attacks, three cells: a weak FGSM cell that fools few inputs and two strong ones.
TINY_SUITE = """
[[attack]]
name = "fgsm"
eps = [0.1, 0.3]

[[attack]]
name = "pgd"
eps = [0.3]
alpha = 0.1
steps = 3
"""


def results_without_timings(run_dir: Path) -> dict:
    """results.json less what legitimately differs between identical runs: times and timings."""
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("timings"), results.pop("started_at"), results.pop("detector_timings", None)
    results.pop("adaptive_timings", None), results.pop("detector_passes", None)  # with torchrun: rank 0's share
    if results.get("gradient_masking"):
        results["gradient_masking"].pop("seconds")
    for attack in results["attacks"]:
        attack.pop("seconds")
        attack.pop("forward_passes"), attack.pop("backward_passes")  # costs, like seconds: none on a cache hit
    return results


def small_mlp(seed: int, n_classes: int = 4):
    """A seeded 64-32-``n_classes`` tanh MLP on 1x8x8 inputs, in eval mode, leaving the global RNG alone."""
    import torch
    from torch import nn

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, n_classes)).eval()


def inputs_labelled_by(model, n: int, seed: int):
    """``n`` seeded 1x8x8 inputs in [0.2, 0.8] and the labels ``model`` gives them (all correct)."""
    import torch

    x = 0.2 + 0.6 * torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)


def shuffled_digits(n: int):
    """The first ``n`` of the embedded default's test digits in a seeded order (the split itself
    is sorted by class, so these cover every class), with their labels."""
    import torch

    from advdetect.sources import embedded

    x, y = embedded.test_split()
    rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    return x[rows], y[rows]
