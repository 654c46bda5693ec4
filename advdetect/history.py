"""Run provenance (``manifest.json``), the runs under an output root, and regressions between runs.

A drop in a detector's AUROC is a regression when the later run's bootstrap 95% interval lies
wholly below the earlier value; a rise in attack success rate is one when the later rate's
Wilson 95% interval lies wholly above the earlier rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from advdetect.storage import read_json, write_json

MANIFEST = "manifest.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def write_manifest(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Create or update the run's manifest; the first call records the command line."""
    path = run_dir / MANIFEST
    manifest = read_json(path) if path.is_file() else {"schema": 1, "command": sys.argv}
    manifest.update(fields)
    write_json(path, manifest)
    return manifest


@dataclass(frozen=True)
class Run:
    path: Path
    manifest: dict[str, Any]

    @property
    def results(self) -> dict[str, Any] | None:
        path = self.path / "results.json"
        return read_json(path) if path.is_file() else None


def list_runs(root: Path) -> list[Run]:
    """Runs directly under ``root``, oldest first."""
    runs = []
    for manifest in root.glob(f"*/{MANIFEST}"):
        try:
            runs.append(Run(manifest.parent, read_json(manifest)))
        except (OSError, ValueError):
            continue  # not a run of ours
    return sorted(runs, key=lambda r: (r.manifest.get("started_at", ""), r.path.name))


def earlier_runs(run_dir: Path) -> list[Run]:
    """Complete runs of the same suite in the same output root that started before this one."""
    current = read_json(run_dir / MANIFEST)
    return [r for r in list_runs(run_dir.parent)
            if r.path.resolve() != run_dir.resolve() and r.manifest.get("status") == "complete"
            and r.manifest.get("suite") == current.get("suite") and r.manifest["started_at"] <= current["started_at"]]


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    center = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return center - half, center + half


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
    return f"{row['attack']}[{row['strength_name']}={row['strength']:g}]"


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
    return differences


def trend(run_dir: Path, current: dict[str, Any], limit: int = 10) -> dict[str, Any] | None:
    """The metrics of earlier runs in the same root, for the report; None when there are none."""
    runs = [r for r in earlier_runs(run_dir) if r.results is not None][-limit:]
    if not runs:
        return None
    rows = []
    for row in current["results"]:
        history = []
        for run in runs:
            match = next((r for r in run.results["results"] if _cell(r) == _cell(row)  # type: ignore[index]
                          and r["detector"] == row["detector"] and r["protocol"] == row["protocol"]), None)
            history.append(None if match is None else match["auroc"])
        rows.append({"cell": _cell(row), "detector": row["detector"], "protocol": row["protocol"], "history": history,
                     "current": row["auroc"]})
    flagged = {(d.cell, d.detector, d.protocol, d.metric) for d in compare(runs[-1].results, current)  # type: ignore[arg-type]
               if d.regression}
    for row in rows:
        row["regression"] = (row["cell"], row["detector"], row["protocol"], "auroc") in flagged
    asr_regressions = sorted(cell for cell, _, _, metric in flagged if metric == "attack_success_rate")
    return {"runs": [r.path.name for r in runs], "rows": rows, "asr_regressions": asr_regressions,
            "regressions": len(flagged)}
