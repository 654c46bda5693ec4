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
    results.pop("adaptive_timings", None)
    if results.get("gradient_masking"):
        results["gradient_masking"].pop("seconds")
    for attack in results["attacks"]:
        attack.pop("seconds")
        attack.pop("forward_passes"), attack.pop("backward_passes")  # costs, like seconds: none on a cache hit
    return results
