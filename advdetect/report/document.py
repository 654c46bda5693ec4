"""Stage 3: ``results.json``, ``report.html`` (self-contained) and ``report.pdf`` from a run folder.

This module reads the run folder and says what the report shows: ``results.json`` (declared by
:class:`~advdetect.run.records.Results`), the key findings, the tables and their notes, gathered in
one view (:func:`report_view`) that :mod:`advdetect.report.html` and :mod:`advdetect.report.pdf`
lay out; :mod:`advdetect.report.figures` draws its figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advdetect.report.figures import Thumbnails, adaptive_png, comparison_png, roc_png, thumbnails_png
from advdetect.report.html import write_html
from advdetect.report.pdf import write_pdf
from advdetect.run.checks import judge, plan_from_document
from advdetect.run.folder import MANIFEST, bound, cell_fooled, cell_paths, read_adaptive, read_arrays, \
    read_attack_records, read_detection, read_masking, read_run, read_scores, sample_arrays, update_run
from advdetect.run.history import trend
from advdetect.run.records import ADAPTIVE, PROTOCOLS, RESULTS_SCHEMA, AttackRecord, OodRecord, ResultRow, Results, \
    RunInfo, cell_label, derive_seed, display_strength
from advdetect.run.robustness import robust_accuracy, worst_case
from advdetect.run.storage import write_json


@dataclass
class Cell:
    """One attack x strength with its result rows and test scores, as the report shows it."""

    record: AttackRecord
    rows: list[ResultRow]
    scores: dict[str, np.ndarray]

    @property
    def anchor(self) -> str:
        return f"roc-{self.record.slug}"


def load_cells(run_dir: Path) -> tuple[RunInfo, list[Cell]]:
    """The run's cells with their rows and scores; refuses a run whose detect stage did not finish,
    so a report is never built from part of a run."""
    info = read_run(run_dir)
    records = read_attack_records(run_dir, info)
    rows = read_detection(run_dir, info, records)
    cells = []
    for record in records:
        if record.robust_accuracy is None and not isinstance(record, OodRecord):  # written before it was recorded
            (record.robust_accuracy, record.robust_accuracy_ci_low,
             record.robust_accuracy_ci_high) = robust_accuracy(int(info.data["n"]), record.n_attacked, record.n_fooled)
        cell_rows = [r for r in rows if r.attack == record.attack and r.strength == record.strength]
        cells.append(Cell(record, cell_rows, read_scores(run_dir, record, cell_rows, info)))
    return info, cells


def results_document(info: RunInfo, cells: list[Cell], robust_accuracy: list[dict[str, Any]] | None = None,
                     adaptive: list[ResultRow] | None = None, masking: dict[str, Any] | None = None) -> dict[str, Any]:
    """``results.json`` (declared by :class:`~advdetect.run.records.Results`): what was audited,
    every cell's record, every result row (the adaptive protocol's last), the per-input worst case
    of robust accuracy per threat model and strength, and the verdict of the suite's thresholds."""
    document = Results(
        schema=RESULTS_SCHEMA, clean_accuracy=info.clean_accuracy, model=info.model, data=info.data, suite=info.suite,
        seed=info.seed, device=info.device, fit_fraction=info.fit_fraction, fit_folds=info.fit_folds,
        versions=info.versions, started_at=info.started_at, timings=info.timings,
        detector_timings=info.detector_timings, detector_passes=info.detector_passes,
        attacks=[cell.record for cell in cells],
        results=[row for cell in cells for row in cell.rows] + list(adaptive or []),
        adaptive_timings=info.adaptive_timings, robust_accuracy=robust_accuracy or [], gradient_masking=masking,
        verdict=None).to_dict()
    checks = plan_from_document(info.suite.get("document", {}), info.suite["name"])
    document["verdict"] = judge(checks, document).record().to_dict() if checks else None
    return document


def worst_case_robustness(run_dir: Path, cells: list[Cell], sample: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Robust accuracy's per-input worst case over the attacks of each threat model and strength."""
    attacked = [c for c in cells if not isinstance(c.record, OodRecord)]
    if not attacked:
        return []
    n_correct = int((sample["pred"] == sample["y"]).sum())
    return worst_case([(c.record.to_dict(), cell_fooled(run_dir, c.record, n_correct)) for c in attacked],
                      len(sample["y"]))


def key_findings(document: dict[str, Any]) -> dict[str, Any]:
    """What a reader opens the report for: the attack that hurts most, the worst case per threat
    model and strength, and the best detector of each attack under each protocol."""
    attacks = [a for a in document["attacks"] if a.get("robust_accuracy") is not None]
    hurts_most = min(attacks, key=lambda a: a["robust_accuracy"], default=None)
    best: dict[str, dict[str, tuple[str, float]]] = {}
    for protocol in PROTOCOLS:
        for attack in dict.fromkeys(a["attack"] for a in document["attacks"]):
            scores: dict[str, list[float]] = {}
            for row in document["results"]:
                if row["attack"] == attack and row["protocol"] == protocol and row["auroc"] is not None:
                    scores.setdefault(row["detector"], []).append(row["auroc"])
            if scores:
                name = max(scores, key=lambda d: float(np.mean(scores[d])))
                best.setdefault(attack, {})[protocol] = (name, float(np.mean(scores[name])))
    return {"hurts_most": hurts_most, "worst_case": document.get("robust_accuracy", []), "best": best}


#: Inputs shown per attack in "what the attacks did".
THUMBNAILS_PER_ATTACK = 4


def attack_thumbnails(run_dir: Path, info: RunInfo, cells: list[Cell],
                      sample: dict[str, np.ndarray]) -> dict[str, Thumbnails]:
    """Per attack, inputs of its strongest cell (fooled ones when there are any), seeded."""
    correct = np.flatnonzero(sample["pred"] == sample["y"])
    shape = sample["x"].shape[1:]
    found = {}
    for attack, attack_cells in _by_attack(cells).items():
        record = attack_cells[-1].record
        if isinstance(record, OodRecord) or not len(correct):
            continue
        _, path = cell_paths(run_dir, record.slug)
        arrays = read_arrays(bound(run_dir, path, info), {"x_adv": ("f", (len(correct), *shape)),
                                                          "fooled": ("b", (len(correct),)),
                                                          "pred": ("iu", (len(correct),))}, only_checked=True)
        pool = np.flatnonzero(arrays["fooled"]) if arrays["fooled"].any() else np.arange(len(correct))
        rng = np.random.default_rng(derive_seed(info.seed, "thumbnails", record.key))
        picks = np.sort(rng.choice(pool, size=min(THUMBNAILS_PER_ATTACK, len(pool)), replace=False))
        found[attack] = Thumbnails(record.key, sample["x"][correct[picks]], arrays["x_adv"][picks],
                                   sample["y"][correct[picks]], arrays["pred"][picks])
    return found


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _by_attack(cells: list[Cell]) -> dict[str, list[Cell]]:
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.record.attack, []).append(cell)
    return groups


def _cells_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    return document["attacks"]


def _aurocs(document: dict[str, Any], protocol: str) -> tuple[list[str], dict[tuple[str, float, str], float | None]]:
    rows = [r for r in document["results"] if r["protocol"] == protocol]
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    return detectors, {(r["attack"], r["strength"], r["detector"]): r["auroc"] for r in rows}


def _best(values: list[float | None]) -> set[int]:
    """Positions of the highest AUROC, ties included (as printed, to 3 decimals)."""
    shown = [None if v is None else round(v, 3) for v in values]
    top = max((v for v in shown if v is not None), default=None)
    return {i for i, v in enumerate(shown) if v is not None and v == top}


def summary_table(document: dict[str, Any], protocol: str = "seen") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary of a results document: one row per attack cell, one AUROC
    column per detector under ``protocol``, the best of each row marked ``*``. The report and the
    terminal show the same table."""
    detectors, aurocs = _aurocs(document, protocol)
    header = ["attack", "strength", "success", "robust acc", "mean L2", "mean Linf", "attack s", *detectors]
    table = []
    for a in _cells_of(document):
        values = [aurocs.get((a["attack"], a["strength"], d)) for d in detectors]
        best = _best(values)
        table.append([a["attack"], cell_label(a), _pct(a["attack_success_rate"]), _pct(a.get("robust_accuracy")),
                      *["-" if a[k] is None else f"{a[k]:.3f}" for k in ("mean_l2", "mean_linf")],
                      f"{a['seconds']:.1f}",
                      *["-" if v is None else f"{v:.3f}{'*' if i in best else ''}" for i, v in enumerate(values)]])
    return header, table


def comparison_tables(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Per protocol, a detector x (attack, strength) AUROC table: ``columns`` are the cells,
    ``rows`` hold (value, is_best) per cell, best per column marked."""
    tables = []
    for protocol in PROTOCOLS:
        if protocol == ADAPTIVE:  # its own section: one budget, beside the oblivious attack
            continue
        detectors, aurocs = _aurocs(document, protocol)
        if not detectors:
            continue
        cells = [(a["attack"], a["strength"], cell_label(a))
                 for a in _cells_of(document)]
        grid = [[aurocs.get((attack, strength, d)) for attack, strength, _ in cells] for d in detectors]
        best = [_best([grid[i][j] for i in range(len(detectors))]) for j in range(len(cells))]
        intervals = {(r["attack"], r["strength"], r["detector"]): (r.get("auroc_ci_low"), r.get("auroc_ci_high"))
                     for r in document["results"] if r["protocol"] == protocol}
        rows = [{"detector": d, "cells": [("-" if v is None else f"{v:.3f}", i in best[j],
                                           _interval(intervals.get((cells[j][0], cells[j][1], d))))
                                          for j, v in enumerate(grid[i])]}
                for i, d in enumerate(detectors)]
        tables.append({"protocol": protocol, "description": PROTOCOL_TEXT[protocol],
                       "columns": [{"attack": a, "strength": label} for a, _, label in cells], "rows": rows})
    return tables


def _interval(bounds: tuple[float | None, float | None] | None) -> str:
    """``±0.023``: half the width of a 95% interval, for a table cell; empty when there is none."""
    if not bounds or bounds[0] is None or bounds[1] is None:
        return ""
    return f"±{(bounds[1] - bounds[0]) / 2:.3f}"


PROTOCOL_TEXT = {
    "seen": "each supervised detector fitted on calibration pairs of the same attack and strength",
    "unseen": "supervised detectors fitted once, on the suite's first attack at its middle strength, "
              "and tested on every other cell",
    "oneclass": "detectors fitted on clean reference inputs only, with no adversarial example",
}


def header_items(info: RunInfo) -> list[tuple[str, str]]:
    model, data = info.model, info.data
    return [
        ("model", f"{model['spec']} ({model['name']}, {model['num_parameters']:,} parameters in "
                  f"{model['num_parameter_tensors']} tensors, sha256 {model['sha256'][:12]})"),
        ("data", f"{data['spec']}: {data['n']} of {data['n_available']} inputs, shape {data['shape']}, "
                 f"{data['num_classes']} classes"),
        ("clean accuracy", f"{info.clean_accuracy:.3f}"),
        ("suite", f"{info.suite['name']} ({info.suite['source']})"),
        ("seed / device", f"{info.seed} / {info.device}"),
        ("protocols", f"seen, unseen, oneclass: {_split_text(info)}; {info.data.get('n_reference', 0)} clean "
                      f"reference inputs; negatives "
                      f"{'clean inputs and noisy copies' if info.noisy_negatives else 'clean inputs'}"),
        ("stage timings", ", ".join(f"{k} {v:.1f} s" for k, v in info.timings.items())
         + ("" if info.attack_cache_hits is None else
            f" ({info.attack_cache_hits} of {len(info.cells)} attack cells from the cache)")),
        ("detector timings", ", ".join(f"{k} {v:.1f} s" for k, v in sorted(
            info.detector_timings.items(), key=lambda item: -item[1])) or "not recorded"),
        ("versions", ", ".join(f"{k} {v}" for k, v in info.versions.items())),
        ("started", info.started_at),
    ]


def verdict_view(document: dict[str, Any]) -> dict[str, Any]:
    """The verdict as the report opens with it: PASS, FAIL or no thresholds, the counts, the failed checks."""
    outcome = document.get("verdict")
    if outcome is None:
        return {"status": "NO THRESHOLDS", "css": "none", "color": "#6c757d", "counts": "",
                "text": "the suite sets no thresholds, so there is nothing to pass or fail; add a [thresholds] table "
                        "and run advdetect check", "failed": []}
    failed = [c for c in outcome["checks"] if c["status"] == "FAILED"]
    return {"status": "FAIL" if failed else "PASS", "css": "fail" if failed else "pass",
            "color": "#b00020" if failed else "#1e7e34",
            "counts": f"{outcome['passed']} passed, {outcome['failed']} failed, {outcome['skipped']} skipped",
            "text": "", "failed": [f"{c['nodeid']} ({c['message']})" for c in failed]}


def finding_lines(document: dict[str, Any]) -> list[tuple[str, str]]:
    """The key numbers, as (label, text) lines."""
    findings = key_findings(document)
    lines = [("clean accuracy", f"{document['clean_accuracy']:.3f} on {document['data']['n']} inputs")]
    for bucket in findings["worst_case"]:
        lines.append((f"robust accuracy, {bucket['threat_model']} {bucket['strength_name']}="
                      f"{display_strength(bucket['strength'])}",
                      f"{bucket['robust_accuracy']:.3f} [{bucket['robust_accuracy_ci_low']:.3f}, "
                      f"{bucket['robust_accuracy_ci_high']:.3f}], worst case over {', '.join(bucket['attacks'])}"))
    masking = document.get("gradient_masking")
    if masking:
        observed = [s for s in masking["symptoms"] if s["observed"]]
        lines.append(("gradient masking", "suspected, so the robustness numbers are unverified: " + "; ".join(
            s["detail"] for s in observed) if observed else
            f"no symptom in {len(masking['symptoms'])} checks on {masking['n_inputs']} inputs at Linf eps "
            f"{display_strength(masking['eps'])}"))
    worst = findings["hurts_most"]
    if worst is not None:
        lines.append(("hurts most", f"{worst['key']}: robust accuracy {worst['robust_accuracy']:.3f}, "
                                    f"success rate {_pct(worst['attack_success_rate'])}"))
    for attack, protocols in findings["best"].items():
        lines.append((f"best detector, {attack}", "; ".join(
            f"{protocol}: {name} (mean AUROC {value:.3f}{', below chance' if value < 0.5 else ''})"
            for protocol, (name, value) in protocols.items())))
    adaptive = [r for r in document["results"] if r["protocol"] == ADAPTIVE]
    if adaptive:
        measured = [r for r in adaptive if r["undetected_success_rate"] is not None]
        best = min(measured, key=lambda r: r["undetected_success_rate"], default=None)
        collapsed = [r["detector"] for r in adaptive if r["tpr_at_5fpr"] is not None and r["tpr_at_5fpr"] < COLLAPSE]
        text = "" if best is None else (
            f"best {best['detector']}: {_pct(best['undetected_success_rate'])} of attacked inputs get past classifier "
            f"and detector (oblivious attack: {_pct(best['oblivious_undetected_success_rate'])})")
        if collapsed:
            text += f"; collapse (flag under {COLLAPSE:.0%} at 5% FPR): {', '.join(collapsed)}"
        lines.append((f"detection against an adaptive attacker, {adaptive[0]['strength_name']}="
                      f"{display_strength(adaptive[0]['strength'])}", text or "no detector was measured"))
    return lines


#: A detector that flags fewer than this share of the adaptive attack's examples at 5% FPR has collapsed.
COLLAPSE = 0.1


def adaptive_view(info: RunInfo, rows: list[ResultRow], scores: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """The section "Against an attacker who knows the detector": per detector, oblivious against
    adaptive TPR at 5% FPR, undetected success and AUROC, and both ROC curves overlaid."""
    if not rows:
        return None
    spec = info.suite["document"]["adaptive"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    table = [{"detector": r.detector, "collapsed": r.tpr_at_5fpr is not None and r.tpr_at_5fpr < COLLAPSE,
              "cells": [pct(r.oblivious_tpr_at_5fpr), pct(r.tpr_at_5fpr), pct(r.oblivious_undetected_success_rate),
                        pct(r.undetected_success_rate),
                        "-" if r.oblivious_auroc is None else f"{r.oblivious_auroc:.3f}",
                        "-" if r.auroc is None else f"{r.auroc:.3f}", str(r.detector_params.get("gradient", ""))]}
             for r in rows]
    collapsed = [t["detector"] for t in table if t["collapsed"]]
    return {"header": ["detector", "TPR@5%FPR oblivious", "TPR@5%FPR adaptive", "undetected success oblivious",
                       "undetected success adaptive", "AUROC oblivious", "AUROC adaptive", "gradient"],
            "rows": table, "png": adaptive_png(rows, scores), "collapsed": collapsed,
            "note": (f"{spec['method'].capitalize()} PGD ({spec['norm']}, eps {display_strength(spec['eps'])}, "
                     f"{spec['steps']} steps) against each detector with its threshold set to flag 5% of the clean "
                     f"calibration inputs, beside the suite's oblivious {spec['attack']} at the same budget on the "
                     f"same test inputs. Undetected success: the share of attacked inputs that are misclassified and "
                     f"not flagged. Adaptive examples are scored by each detector's own scores, not the differentiable "
                     f"stand-in the attacker used (gradient: exact, or bpda, eot, surrogate where a step is not "
                     f"differentiable).")
            + (f" Collapsed (flags under {COLLAPSE:.0%} of adaptive examples at 5% FPR): {', '.join(collapsed)}."
               if collapsed else " No detector collapsed.")}


def _plotted(cell: Cell, protocol: str = "seen") -> bool:
    return any(r.auroc is not None for r in cell.rows if r.protocol == protocol)


def _unplotted_reason(cell: Cell, protocol: str = "seen") -> str:
    return next((r.reason for r in cell.rows if r.protocol == protocol and r.reason), "no detector was scored")


def report_sections(info: RunInfo, cells: list[Cell], thumbnails: dict[str, Thumbnails]) -> list[dict[str, Any]]:
    """Per attack, what the HTML and the PDF both show: ROC figures (PNG, base64) with their
    captions, one line per cell with nothing to plot, the strength comparison and the thumbnails."""
    sections = []
    for attack, attack_cells in _by_attack(cells).items():
        figures, unplotted = [], []
        for cell in attack_cells:
            if not _plotted(cell):
                unplotted.append(f"{cell.record.key}: no ROC, {_unplotted_reason(cell)}")
                continue
            rows = [r for r in cell.rows if r.protocol == "seen"]
            unscored: dict[str, list[str]] = {}  # reason -> detectors, so a shared reason is said once
            for r in rows:
                if r.auroc is None:
                    unscored.setdefault(r.reason or "not scored", []).append(r.detector)
            figures.append({"anchor": cell.anchor, "alt": f"ROC curves, {cell.record.key}",
                            "png": roc_png(cell.record, cell.rows, cell.scores, info.detectors),
                            "captions": [_caption(r) for r in rows if r.auroc is not None]
                            + [f"{', '.join(names)}: {reason}" for reason, names in unscored.items()]})
        comparison = comparison_png([(c.record, c.rows) for c in attack_cells], info.detectors)
        strip = thumbnails.get(attack)
        strip_png = None if strip is None else thumbnails_png(strip)
        record = attack_cells[0].record
        sections.append({"attack": attack, "figures": figures, "unplotted": unplotted, "comparison": comparison,
                         "params": " ".join(f"{k}={v}" for k, v in record.params.items() if k != record.strength_name),
                         "thumbnails": strip_png, "thumbnails_key": strip.key if strip else None})
    return sections


def _caption(row: ResultRow) -> str:
    params = ", ".join(f"{k}={v}" for k, v in row.detector_params.items())
    return (f"{row.detector}: AUROC {row.auroc:.3f}, FPR@95%TPR {row.fpr_at_95tpr:.3f}, detection accuracy "
            f"{row.detection_accuracy:.3f}" + (f" ({params})" if params else ""))


#: How to read the summary, in both the HTML and the PDF.
READING_NOTE = ("How to read this: success is the share of correctly classified inputs that the attack fooled (lower "
                "is a more robust model); robust acc the share of all audited inputs still classified correctly. AUROC "
                "is the probability that a detector scores a random adversarial input above a random clean one: 0.5 is "
                "chance, 1.0 is perfect separation. A dash means the cell had too few adversarial examples to fit or "
                "score; its reason is under its figure.")
ROBUST_NOTE = ("Robust accuracy is the share of all audited inputs that the model still classifies correctly under "
               "attack (RobustBench's definition), with its Wilson 95% interval; the worst case counts an input as "
               "robust only if no attack of that threat model and strength fooled it.")


def report_view(info: RunInfo, cells: list[Cell], document: dict[str, Any], trend: dict[str, Any] | None,
                thumbnails: dict[str, Thumbnails], adaptive: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the report shows, once, for the HTML template and the PDF layout alike."""
    header, table = summary_table(document)
    return {"adaptive": adaptive, "header_items": header_items(info), "header": header, "table": table,
            "sections": report_sections(info, cells, thumbnails), "trend": trend,
            "comparisons": comparison_tables(document), "verdict": verdict_view(document),
            "findings": finding_lines(document), "reading_note": READING_NOTE, "robust_note": ROBUST_NOTE}


def write_report(run_dir: Path) -> dict[str, Any]:
    """Write ``report.pdf``, ``report.html`` and ``results.json``; returns the results document."""
    started = time.perf_counter()
    info, cells = load_cells(run_dir)
    adaptive_rows, adaptive_scores = read_adaptive(run_dir, info)
    sample = sample_arrays(run_dir, info)
    document = results_document(info, cells, worst_case_robustness(run_dir, cells, sample), adaptive_rows,
                                read_masking(run_dir, info))
    run_trend = trend(run_dir, document) if (run_dir / MANIFEST).is_file() else None
    thumbnails = attack_thumbnails(run_dir, info, cells, sample)
    view = report_view(info, cells, document, run_trend, thumbnails,
                       adaptive_view(info, adaptive_rows, adaptive_scores))
    write_pdf(run_dir / "report.pdf", view)
    write_html(run_dir / "report.html", view)
    info = update_run(run_dir, ("report", time.perf_counter() - started))
    document["timings"] = info.timings
    write_json(run_dir / "results.json", document)
    return document


def _split_text(info: RunInfo) -> str:
    if info.fit_folds:
        return (f"supervised detectors cross-fitted over {info.fit_folds} folds of the correctly classified inputs "
                f"(each fold tested by detectors fitted on the others), every fooled pair tested")
    return f"{100 * info.fit_fraction:g}% of the correctly classified inputs calibrate, the rest test"
