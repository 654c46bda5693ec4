"""Stage 3: ``results.json``, ``report.html`` (self-contained) and ``report.pdf`` from a run folder."""

from __future__ import annotations

import base64
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from advdetect.history import trend  # noqa: E402
from advdetect.records import PROTOCOLS, RESULTS_SCHEMA, AttackRecord, OodRecord, ResultRow, RunInfo, cell_label, \
    format_strength  # noqa: E402
from advdetect.rundir import MANIFEST, read_attack_records, read_detection, read_run, read_scores, update_run  # noqa: E402
from advdetect.storage import atomic_write, write_bytes, write_json  # noqa: E402

#: User strings (suite names, attack ids, model specs) reach titles and labels: drawn as typed,
#: never as matplotlib math text, where a pair of "$" would fail or change the text.
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}

DETECTOR_COLORS = plt.get_cmap("tab10").colors


@dataclass
class Cell:
    """One attack x strength with its result rows and test scores, as the report shows it."""

    record: AttackRecord
    rows: list[ResultRow]
    scores: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        return cell_label(self.record.to_dict(), " = ")

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
        cell_rows = [r for r in rows if r.attack == record.attack and r.strength == record.strength]
        cells.append(Cell(record, cell_rows, read_scores(run_dir, record, cell_rows)))
    return info, cells


def results_document(info: RunInfo, cells: list[Cell]) -> dict[str, Any]:
    return {
        "schema": RESULTS_SCHEMA,
        "clean_accuracy": info.clean_accuracy,
        "model": info.model,
        "data": info.data,
        "suite": info.suite,
        "seed": info.seed,
        "device": info.device,
        "fit_fraction": info.fit_fraction,
        "versions": info.versions,
        "started_at": info.started_at,
        "timings": info.timings,
        "attacks": [cell.record.to_dict() for cell in cells],
        "results": [row.to_dict() for cell in cells for row in cell.rows],
    }


def _color(detectors: list[str], name: str) -> tuple[float, float, float]:
    return DETECTOR_COLORS[detectors.index(name) % len(DETECTOR_COLORS)]


def draw_roc(ax: plt.Axes, cell: Cell, detectors: list[str], protocol: str = "seen") -> None:
    """ROC curves of every detector on one cell, under one protocol."""
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance (0.500)")
    reasons = []
    rows = [r for r in cell.rows if r.protocol == protocol]
    for row in rows:
        clean = cell.scores.get(f"{protocol}__{row.detector}__clean")
        adversarial = cell.scores.get(f"{protocol}__{row.detector}__adversarial")
        if row.auroc is None or clean is None or adversarial is None:
            reasons.append(row.reason or "not scored")
            continue
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(clean)), np.ones(len(adversarial))], np.r_[clean, adversarial])
        ax.plot(fpr, tpr, color=_color(detectors, row.detector), linewidth=1.8, label=f"{row.detector} ({row.auroc:.3f})")
    if reasons and len(reasons) == len(rows):
        ax.text(0.5, 0.55, "no ROC:\n" + _wrap(reasons[0], 38), ha="center", va="center", fontsize=7, color="0.3",
                transform=ax.transAxes, bbox={"facecolor": "white", "edgecolor": "0.8"})
    asr = cell.record.attack_success_rate
    ax.set_title(f"{cell.record.attack}  {cell.label} ({protocol})\nsuccess {_pct(asr)}, "
                 f"test {rows[0].n_adv if rows else 0} adv. / {rows[0].n_clean if rows else 0} clean",
                 fontsize=8)
    ax.set_xlabel("false-positive rate (clean flagged)", fontsize=8)
    ax.set_ylabel("true-positive rate (adversarial flagged)", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    ax.legend(loc="lower right", fontsize=6, title="detector (AUROC)", title_fontsize=6)


def draw_comparison(ax: plt.Axes, attack_cells: list[Cell], detectors: list[str]) -> None:
    """AUROC of every detector (``seen`` protocol) against strength, with the attack success rate."""
    strengths = [c.record.strength for c in attack_cells]
    positions = np.arange(len(strengths))
    for name in detectors:
        values = [next((r.auroc for r in c.rows if r.detector == name and r.protocol == "seen"), None)
                  for c in attack_cells]
        ax.plot(positions, [np.nan if v is None else v for v in values], marker="o", color=_color(detectors, name), label=name)
    ax.plot(positions, [np.nan if c.record.attack_success_rate is None else c.record.attack_success_rate for c in attack_cells],
            marker="s", linestyle=":", color="0.35", label="attack success rate")
    ax.axhline(0.5, linestyle="--", color="0.7", linewidth=1)
    ax.set_xticks(positions, [c.record.label if isinstance(c.record, OodRecord) else format_strength(c.record.strength)
                              for c in attack_cells])
    ax.set_xlabel(attack_cells[0].record.strength_name, fontsize=8)
    ax.set_ylabel("AUROC / success rate", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{attack_cells[0].record.attack}: detectors by strength (seen)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


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
    header = ["attack", "strength", "success", "mean L2", "mean Linf", *detectors]
    table = []
    for a in _cells_of(document):
        values = [aurocs.get((a["attack"], a["strength"], d)) for d in detectors]
        best = _best(values)
        table.append([a["attack"], cell_label(a), _pct(a["attack_success_rate"]),
                      *["-" if a[k] is None else f"{a[k]:.3f}" for k in ("mean_l2", "mean_linf")],
                      *["-" if v is None else f"{v:.3f}{'*' if i in best else ''}" for i, v in enumerate(values)]])
    return header, table


def comparison_tables(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Per protocol, a detector x (attack, strength) AUROC table: ``columns`` are the cells,
    ``rows`` hold (value, is_best) per cell, best per column marked."""
    tables = []
    for protocol in PROTOCOLS:
        detectors, aurocs = _aurocs(document, protocol)
        if not detectors:
            continue
        cells = [(a["attack"], a["strength"], cell_label(a))
                 for a in _cells_of(document)]
        grid = [[aurocs.get((attack, strength, d)) for attack, strength, _ in cells] for d in detectors]
        best = [_best([grid[i][j] for i in range(len(detectors))]) for j in range(len(cells))]
        rows = [{"detector": d, "cells": [("-" if v is None else f"{v:.3f}", i in best[j]) for j, v in enumerate(grid[i])]}
                for i, d in enumerate(detectors)]
        tables.append({"protocol": protocol, "description": PROTOCOL_TEXT[protocol],
                       "columns": [{"attack": a, "strength": label} for a, _, label in cells], "rows": rows})
    return tables


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
        ("protocols", f"seen, unseen, oneclass: {100 * info.fit_fraction:g}% of the correctly classified inputs "
                      f"calibrate, the rest test; {info.data.get('n_reference', 0)} clean reference inputs; negatives "
                      f"{'clean inputs and noisy copies' if info.noisy_negatives else 'clean inputs'}"),
        ("stage timings", ", ".join(f"{k} {v:.1f} s" for k, v in info.timings.items())
         + ("" if info.attack_cache_hits is None else
            f" ({info.attack_cache_hits} of {len(info.cells)} attack cells from the cache)")),
        ("versions", ", ".join(f"{k} {v}" for k, v in info.versions.items())),
        ("started", info.started_at),
    ]


#: Trend table rows per PDF page (one row per cell x detector x protocol).
TREND_ROWS_PER_PAGE = 34


def draw_trend_page(pdf: PdfPages, trend: dict[str, Any]) -> None:
    table = [[r["cell"], f"{r['detector']} ({r['protocol']})", " ".join("-" if v is None else f"{v:.3f}" for v in r["history"]),
              "-" if r["current"] is None else f"{r['current']:.3f}", "REGRESSION" if r["regression"] else ""]
             for r in trend["rows"]]
    pages = [table[i : i + TREND_ROWS_PER_PAGE] for i in range(0, len(table), TREND_ROWS_PER_PAGE)] or [[]]
    for number, rows in enumerate(pages, start=1):
        fig = plt.figure(figsize=(11.7, 8.3))
        fig.text(0.04, 0.95, f"Trend over {len(trend['runs'])} earlier run(s) in this output root"
                             + (f" ({number} of {len(pages)})" if len(pages) > 1 else ""), fontsize=14, weight="bold")
        fig.text(0.04, 0.915, f"{trend['regressions']} regression(s) against the last run: an AUROC whose 95% bootstrap "
                              f"interval lies below the earlier value, or a success rate whose 95% interval lies above it"
                              + (f" (success rate: {', '.join(trend['asr_regressions'])})" if trend["asr_regressions"] else ""),
                 fontsize=8)
        ax = fig.add_axes([0.04, 0.03, 0.92, 0.85])
        ax.axis("off")
        if rows:
            tbl = ax.table(cellText=rows, colLabels=["cell", "detector", "earlier AUROC (oldest first)", "AUROC now", ""],
                           loc="upper center", cellLoc="center")
            tbl.auto_set_font_size(False)
            tbl.set_fontsize(7)
            for (i, j), cell in tbl.get_celld().items():
                if i > 0 and rows[i - 1][4]:
                    cell.set_facecolor("#f8d7da")
        pdf.savefig(fig)
        plt.close(fig)


def draw_comparison_page(pdf: PdfPages, table: dict[str, Any]) -> None:
    fig = plt.figure(figsize=(11.7, 8.3))
    fig.text(0.04, 0.95, f"Detector comparison, protocol {table['protocol']}: AUROC", fontsize=14, weight="bold")
    fig.text(0.04, 0.915, _wrap(table["description"] + "; the best of each column is bold.", 170), fontsize=8, va="top")
    ax = fig.add_axes([0.02, 0.05, 0.96, 0.83])
    ax.axis("off")
    labels = ["detector", *[f"{c['attack']}\n{c['strength']}" for c in table["columns"]]]
    text = [[row["detector"], *[v for v, _ in row["cells"]]] for row in table["rows"]]
    widths = [0.17, *[0.83 / len(table["columns"])] * len(table["columns"])]
    tbl = ax.table(cellText=text, colLabels=labels, colWidths=widths, loc="upper center", cellLoc="center")
    tbl.auto_set_font_size(False)
    tbl.set_fontsize(6.5 if len(table["columns"]) <= 16 else 5)
    tbl.scale(1, 1.6)
    for (i, j), cell in tbl.get_celld().items():
        if i == 0:
            cell.set_height(cell.get_height() * 1.6)
            cell.set_facecolor("#f3f3f3")
        elif j > 0 and table["rows"][i - 1]["cells"][j - 1][1]:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#d4edda")
    pdf.savefig(fig)
    plt.close(fig)


def write_pdf(path: Path, info: RunInfo, cells: list[Cell], document: dict[str, Any],
              trend: dict[str, Any] | None = None) -> None:
    def render(handle: Any) -> None:
        with PdfPages(handle) as pdf:
            fig = plt.figure(figsize=(11.7, 8.3))
            fig.text(0.04, 0.95, "advdetect audit report", fontsize=16, weight="bold")
            y = 0.90
            for key, value in header_items(info):
                fig.text(0.04, y, f"{key}:", fontsize=8, weight="bold")
                fig.text(0.17, y, _wrap(value, 150), fontsize=8, va="top" if len(value) > 150 else "baseline")
                y -= 0.03 if len(value) <= 150 else 0.045
            header, table = summary_table(document)
            ax = fig.add_axes([0.04, 0.03, 0.92, y - 0.06])
            ax.axis("off")
            tbl = ax.table(cellText=table, colLabels=header, loc="upper center", cellLoc="center")
            tbl.auto_set_font_size(False)
            tbl.set_fontsize(7)
            tbl.scale(1, 1.15)
            pdf.savefig(fig)
            plt.close(fig)
            for table in comparison_tables(document):
                draw_comparison_page(pdf, table)
            if trend:
                draw_trend_page(pdf, trend)
            for attack, attack_cells in _by_attack(cells).items():
                columns = len(attack_cells) + 1
                ncols = min(columns, 4)
                nrows = math.ceil(columns / ncols)
                fig, axes = plt.subplots(nrows, ncols, figsize=(11.7, 8.3 if nrows > 1 else 4.6), squeeze=False)
                for ax, cell in zip(axes.flat, attack_cells):
                    draw_roc(ax, cell, info.detectors)
                draw_comparison(axes.flat[len(attack_cells)], attack_cells, info.detectors)
                for ax in list(axes.flat)[columns:]:
                    ax.axis("off")
                fig.suptitle(f"{attack}: ROC per strength, every detector, protocol seen (adversarial = positive)",
                             fontsize=12)
                fig.tight_layout()
                pdf.savefig(fig)
                plt.close(fig)

    atomic_write(path, render)


def write_html(path: Path, info: RunInfo, cells: list[Cell], document: dict[str, Any],
               trend: dict[str, Any] | None = None) -> None:
    sections = []
    for attack, attack_cells in _by_attack(cells).items():
        figures = []
        for cell in attack_cells:
            fig, ax = plt.subplots(figsize=(4.2, 4.4))
            draw_roc(ax, cell, info.detectors)
            rows = [r for r in cell.rows if r.protocol == "seen"]
            unscored: dict[str, list[str]] = {}  # reason -> detectors, so a shared reason is said once
            for r in rows:
                if r.auroc is None:
                    unscored.setdefault(r.reason or "not scored", []).append(r.detector)
            figures.append({"anchor": cell.anchor, "alt": f"ROC curves, {cell.record.key}", "png": _png(fig),
                            "rows": [r for r in rows if r.auroc is not None], "unscored": unscored})
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        draw_comparison(ax, attack_cells, info.detectors)
        sections.append({"attack": attack, "figures": figures, "comparison": _png(fig),
                         "params": attack_cells[0].record.params, "strength_name": attack_cells[0].record.strength_name})
    header, table = summary_table(document)
    env = Environment(loader=PackageLoader("advdetect", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        header_items=header_items(info), header=header, table=table, sections=sections, detectors=info.detectors,
        trend=trend, comparisons=comparison_tables(document),
    )
    write_bytes(path, html.encode())


def write_report(run_dir: Path) -> dict[str, Any]:
    """Write ``report.pdf``, ``report.html`` and ``results.json``; returns the results document."""
    started = time.perf_counter()
    info, cells = load_cells(run_dir)
    document = results_document(info, cells)
    run_trend = trend(run_dir, document) if (run_dir / MANIFEST).is_file() else None
    with matplotlib.rc_context(LITERAL_TEXT):
        write_pdf(run_dir / "report.pdf", info, cells, document, run_trend)
        write_html(run_dir / "report.html", info, cells, document, run_trend)
    info = update_run(run_dir, ("report", time.perf_counter() - started))
    document["timings"] = info.timings
    write_json(run_dir / "results.json", document)
    return document
