import json
from pathlib import Path


def results_without_timings(run_dir: Path) -> dict:
    """results.json less what legitimately differs between identical runs: times and timings."""
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("timings"), results.pop("started_at")
    for attack in results["attacks"]:
        attack.pop("seconds")
    return results
