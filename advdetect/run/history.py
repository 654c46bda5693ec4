"""Run provenance (``manifest.json``), the runs under an output root, and regressions between runs.

A drop in a detector's AUROC is a regression when the later run's bootstrap 95% interval lies
wholly below the earlier value; a rise in attack success rate is one when the later rate's
Wilson 95% interval lies wholly above the earlier rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from advdetect.errors import DamagedRunFolder
from advdetect.run.records import cell_key
from advdetect.run.robustness import wilson_interval
from advdetect.run.folder import MANIFEST, read_manifest, read_results

log = logging.getLogger(__name__)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Run:
    path: Path
    manifest: dict[str, Any]


def list_runs(root: Path) -> list[Run]:
    """Runs directly under ``root``, oldest first; a damaged one is skipped with a warning."""
    runs = []
    for manifest in root.glob(f"*/{MANIFEST}"):
        try:
            runs.append(Run(manifest.parent, read_manifest(manifest.parent)))
        except DamagedRunFolder as exc:
            log.warning("skipping %s (%s)", manifest.parent, exc)
    return sorted(runs, key=lambda r: (r.manifest.get("started_at", ""), r.path.name))


def earlier_results(run_dir: Path, limit: int) -> list[tuple[Run, dict[str, Any]]]:
    """The results of the last ``limit`` complete runs of the same suite in the same output root that
    started before this one; a damaged one is skipped with a warning, never failing this run."""
    current = read_manifest(run_dir)
    earlier = [r for r in list_runs(run_dir.parent)
               if r.path.resolve() != run_dir.resolve() and r.manifest.get("status") == "complete"
               and r.manifest.get("suite") == current.get("suite")
               and r.manifest.get("started_at", "") <= current.get("started_at", "")]
    found: list[tuple[Run, dict[str, Any]]] = []
    for run in reversed(earlier):
        if len(found) == limit:
            break
        if not (run.path / "results.json").is_file():
            continue
        try:
            found.append((run, read_results(run.path / "results.json")))
        except DamagedRunFolder as exc:
            log.warning("trend: skipping %s (%s)", run.path, exc)
    return found[::-1]


@dataclass(frozen=True)
class Difference:
    cell: str
    detector: str | None
    metric: str
    before: float | None
    after: float | None
    regression: bool
    protocol: str | None = None

    @property
    def delta(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before


def _cell(row: dict[str, Any]) -> str:
    return cell_key(row["attack"], row["strength_name"], row["strength"])


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[Difference]:
    """Every metric both runs measured, cell by cell, with regressions flagged."""
    differences = []
    earlier_attacks = {_cell(a): a for a in before["attacks"]}
    for attack in after["attacks"]:
        old = earlier_attacks.get(_cell(attack))
        if old is None or old["attack_success_rate"] is None or attack["attack_success_rate"] is None:
            continue
        low, _ = wilson_interval(attack["attack_success_rate"], attack["n_attacked"])
        differences.append(Difference(_cell(attack), None, "attack_success_rate", old["attack_success_rate"],
                                      attack["attack_success_rate"], low > old["attack_success_rate"]))
    earlier_rows = {(_cell(r), r["detector"], r["protocol"]): r for r in before["results"]}
    for row in after["results"]:
        old = earlier_rows.get((_cell(row), row["detector"], row["protocol"]))
        if old is None or old["auroc"] is None or row["auroc"] is None:
            continue
        high = row.get("auroc_ci_high")
        differences.append(Difference(_cell(row), row["detector"], "auroc", old["auroc"], row["auroc"],
                                      high is not None and high < old["auroc"], row["protocol"]))
    return differences + _lost(before, after)


def _lost(before: dict[str, Any], after: dict[str, Any]) -> list[Difference]:
    """Metrics the earlier run measured that the later one does not have: flagged, since a
    comparison cannot vouch for what it cannot see."""
    measured = {_cell(a) for a in after["attacks"] if a["attack_success_rate"] is not None}
    rows = {(_cell(r), r["detector"], r["protocol"]) for r in after["results"] if r["auroc"] is not None}
    lost = [Difference(_cell(a), None, "attack_success_rate", a["attack_success_rate"], None, True)
            for a in before["attacks"] if a["attack_success_rate"] is not None and _cell(a) not in measured]
    lost += [Difference(_cell(r), r["detector"], "auroc", r["auroc"], None, True, r["protocol"])
             for r in before["results"] if r["auroc"] is not None
             and (_cell(r), r["detector"], r["protocol"]) not in rows]
    return lost


def trend(run_dir: Path, current: dict[str, Any], limit: int = 10) -> dict[str, Any] | None:
    """The metrics of earlier runs in the same root, for the report; None when there are none."""
    runs = earlier_results(run_dir, limit)
    if not runs:
        return None
    rows = []
    for row in current["results"]:
        history = []
        for _, results in runs:
            match = next((r for r in results["results"] if _cell(r) == _cell(row)
                          and r["detector"] == row["detector"] and r["protocol"] == row["protocol"]), None)
            history.append(None if match is None else match["auroc"])
        rows.append({"cell": _cell(row), "detector": row["detector"], "protocol": row["protocol"], "history": history,
                     "current": row["auroc"]})
    flagged = {(d.cell, d.detector, d.protocol, d.metric) for d in compare(runs[-1][1], current) if d.regression}
    for row in rows:
        row["regression"] = (row["cell"], row["detector"], row["protocol"], "auroc") in flagged
    asr_regressions = sorted(cell for cell, _, _, metric in flagged if metric == "attack_success_rate")
    return {"runs": [r.path.name for r, _ in runs], "rows": rows, "asr_regressions": asr_regressions,
            "regressions": len(flagged)}
