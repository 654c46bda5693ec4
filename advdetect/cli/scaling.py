"""``advdetect bench --audit``: what an audit costs, stage by stage and detector by detector, and
how that cost grows with the number of audited inputs.

The same audit runs at each ``--n`` of ``sizes`` (without the attack cache, so every attack is
timed) into a temporary folder; the report gives each stage's and detector's seconds per size,
and the exponent ``b`` of ``seconds ~ n^b`` between the smallest and the largest size (1: linear).

Each attack cell also gets its floor: the model passes it made (counted, see
:mod:`advdetect.signatures.passes`) times the cost of one pass per input, measured right after the
audit in the same process, on the same device, at the audit's batch size. Its floor ratio,
``seconds / floor``, is 1 for a cell that does nothing but its passes at full batches; what lies
above 1 is the attack's own work, smaller batches and the stage's bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advdetect.signatures.passes import PassCost, measure_pass_cost
from advdetect.stages.pipeline import run_audit
from advdetect.stages.preflight import AuditOptions, prepare


def measure(options: AuditOptions, sizes: Sequence[int]) -> dict[str, Any]:
    """Run the audit of ``options`` once per size of ``sizes``; seconds per stage, detector and attack.
    Every size is checked before the first audit runs, so a size the data cannot give is refused
    before any work."""
    prepared = {n: prepare(dataclasses.replace(options, n=n, cache_dir=None)) for n in sizes}
    runs = []
    with tempfile.TemporaryDirectory(prefix="advdetect-bench-") as scratch:
        for n in sizes:
            sized = dataclasses.replace(options, n=n, cache_dir=None)
            _, document = run_audit(sized, Path(scratch) / f"n{n}")
            attacks: dict[str, float] = {}
            for record in document["attacks"]:
                attacks[record["attack"]] = attacks.get(record["attack"], 0.0) + record["seconds"]
            cost = measure_pass_cost(prepared[n].loaded.module, prepared[n].sample.x[: options.batch_size])
            runs.append({"n": n, "attacked": document["attacks"][0]["n_attacked"] if document["attacks"] else 0,
                         "stages": document["timings"], "detectors": document.get("detector_timings", {}),
                         "attacks": {k: round(v, 3) for k, v in attacks.items()},
                         "pass_cost": cost.to_dict(), "cells": cell_floors(document["attacks"], cost),
                         "detector_floors": detector_floors(document, cost)})
    return {"suite": options.suite.name, "model": options.model_label, "data": options.data_label,
            "sizes": list(sizes), "runs": runs, "growth": growth(runs)}


def cell_floors(records: list[dict[str, Any]], cost: PassCost) -> dict[str, dict[str, Any]]:
    """Per attack cell of ``results.json``: its seconds, the passes it made, its floor (those passes at
    ``cost``) and its floor ratio, seconds / floor (None where no pass was counted)."""
    return {record["key"]: _floor(record["seconds"], record.get("forward_passes"), record.get("backward_passes"), cost)
            for record in records}


def detector_floors(document: dict[str, Any], cost: PassCost) -> dict[str, dict[str, Any]]:
    """Per detector of ``results.json``, as :func:`cell_floors`: its seconds in the detect stage
    against the model passes it made there. What lies above the floor is its own work (fitting,
    distances, noisy copies stopped partway) besides the passes."""
    passes = document.get("detector_passes", {})
    return {name: _floor(seconds, passes.get(name, {}).get("forward"), passes.get(name, {}).get("backward"), cost)
            for name, seconds in document.get("detector_timings", {}).items()}


def _floor(seconds: float, forward: int | None, backward: int | None, cost: PassCost) -> dict[str, Any]:
    floor = cost.floor(forward, backward) if forward is not None and backward is not None else None
    return {"seconds": seconds, "forward_passes": forward, "backward_passes": backward, "floor_seconds": floor,
            "floor_ratio": seconds / floor if floor else None}


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
    lines = [f"audit cost of suite {report['suite']} on {report['model']} / {report['data']}; n = audited inputs, "
             f"b = exponent of seconds ~ n^b from n={sizes[0]} to n={sizes[-1]} (1 is linear)"]
    lines += _table([header, *rows])
    return "\n".join([*lines, "", *format_floors(report["runs"][-1])])


def format_floors(run: dict[str, Any]) -> list[str]:
    """The attack cells and the detectors of one run against their floor: passes, seconds, floor
    seconds and floor ratio."""
    cost = run["pass_cost"]
    lines = [(f"attack cells and detectors at n={run['n']} against their floor: the passes counted (per input) "
              f"times the cost of one pass per input, measured after the audit at batch {cost['batch_size']}: "
              f"forward {cost['forward'] * 1e3:.3f} ms, forward+backward {cost['forward_backward'] * 1e3:.3f} ms")]
    for label, floors in (("cell", run["cells"]), ("detector", run.get("detector_floors", {}))):
        header = [label, "forward", "backward", "seconds", "floor (s)", "floor ratio"]
        rows = [[key, _count(part["forward_passes"]), _count(part["backward_passes"]), f"{part['seconds']:.2f}",
                 "-" if part["floor_seconds"] is None else f"{part['floor_seconds']:.2f}",
                 "-" if part["floor_ratio"] is None else f"{part['floor_ratio']:.2f}"]
                for key, part in floors.items()]
        lines += ["", *_table([header, *rows])] if rows else []
    return lines


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
