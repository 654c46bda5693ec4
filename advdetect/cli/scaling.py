"""``advdetect bench --audit``: what an audit costs, stage by stage and detector by detector, and
how that cost grows with the number of audited inputs.

The same audit runs at each ``--n`` of ``sizes`` (without the attack cache, so every attack is
timed) into a temporary folder; the report gives each stage's and detector's seconds per size,
and the exponent ``b`` of ``seconds ~ n^b`` between the smallest and the largest size (1: linear).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from advdetect.stages.pipeline import run_audit
from advdetect.stages.preflight import AuditOptions, prepare


def measure(options: AuditOptions, sizes: Sequence[int]) -> dict[str, Any]:
    """Run the audit of ``options`` once per size of ``sizes``; seconds per stage, detector and attack.
    Every size is checked before the first audit runs, so a size the data cannot give is refused
    before any work."""
    for n in sizes:
        prepare(dataclasses.replace(options, n=n, cache_dir=None))
    runs = []
    with tempfile.TemporaryDirectory(prefix="advdetect-bench-") as scratch:
        for n in sizes:
            sized = dataclasses.replace(options, n=n, cache_dir=None)
            _, document = run_audit(sized, Path(scratch) / f"n{n}")
            attacks: dict[str, float] = {}
            for record in document["attacks"]:
                attacks[record["attack"]] = attacks.get(record["attack"], 0.0) + record["seconds"]
            runs.append({"n": n, "attacked": document["attacks"][0]["n_attacked"] if document["attacks"] else 0,
                         "stages": document["timings"], "detectors": document.get("detector_timings", {}),
                         "attacks": {k: round(v, 3) for k, v in attacks.items()}})
    return {"suite": options.suite.name, "model": options.model_label, "data": options.data_label,
            "sizes": list(sizes), "runs": runs, "growth": growth(runs)}


def growth(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The exponent b of seconds ~ n^b from the first run to the last, per stage, detector and attack."""
    first, last = runs[0], runs[-1]
    out: dict[str, dict[str, float | None]] = {}
    for part in ("stages", "attacks", "detectors"):
        out[part] = {}
        for name, before in first[part].items():
            after = last[part].get(name)
            ok = after is not None and before > 0 and after > 0 and last["n"] != first["n"]
            out[part][name] = round(math.log(after / before) / math.log(last["n"] / first["n"]), 2) if ok else None
    return out


def format_report(report: dict[str, Any]) -> str:
    sizes = [run["n"] for run in report["runs"]]
    header = ["part", *[f"n={n} (s)" for n in sizes], "growth n^b"]
    rows = []
    for part, label in (("stages", "stage"), ("attacks", "attack"), ("detectors", "detector")):
        names = list(report["runs"][-1][part])
        for name in sorted(names, key=lambda k: -report["runs"][-1][part][k]) if part == "detectors" else names:
            b = report["growth"][part].get(name)
            rows.append([f"{label} {name}", *[f"{run[part].get(name, 0.0):.1f}" for run in report["runs"]],
                         "-" if b is None else f"{b:.2f}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"audit cost of suite {report['suite']} on {report['model']} / {report['data']}; n = audited inputs, "
             f"b = exponent of seconds ~ n^b from n={sizes[0]} to n={sizes[-1]} (1 is linear)"]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
