"""The report's figures, each a PNG (base64) that the HTML and the PDF both show: ROC curves of a
cell, the detectors of an attack by strength, the adaptive attacker's ROC curves and thumbnails of
what an attack did.

Drawn with matplotlib's object-oriented API, a :class:`~matplotlib.figure.Figure` on its own Agg
canvas: neither importing nor using this module touches pyplot, the backend or any rcParam outside
the drawing of one figure, so a notebook's inline plots keep working.
"""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from advdetect.run.records import AttackRecord, OodRecord, ResultRow, cell_label, display_strength

#: User strings (suite names, attack ids, model specs) reach titles and labels: drawn as typed,
#: never as matplotlib math text, where a pair of "$" would fail or change the text.
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}

DETECTOR_COLORS = matplotlib.colormaps["tab10"].colors

#: An attack's cells with their result rows, in strength order.
CellRows = Sequence[tuple[AttackRecord, Sequence[ResultRow]]]


@dataclass
class Thumbnails:
    """A few seeded inputs of one cell: clean, adversarial and the perturbation amplified to the
    full range, with the label and the model's class on the adversarial input."""

    key: str
    clean: np.ndarray
    adversarial: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray

    @property
    def amplified(self) -> tuple[np.ndarray, float]:
        delta = self.adversarial - self.clean
        gain = 0.5 / max(float(np.abs(delta).max()), 1e-12)
        return 0.5 + gain * delta, gain


def render(figsize: tuple[float, float], draw: Callable[[Figure], None]) -> str:
    """A new figure of ``figsize`` inches, drawn by ``draw`` with user text taken literally, as a
    base64 PNG."""
    buffer = io.BytesIO()
    with matplotlib.rc_context(LITERAL_TEXT):
        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        draw(fig)
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def roc_png(record: AttackRecord, rows: Sequence[ResultRow], scores: Mapping[str, np.ndarray],
            detectors: list[str]) -> str:
    """The ROC curves of one cell (``seen`` protocol)."""
    return render((4.2, 4.4), lambda fig: draw_roc(fig.subplots(), record, rows, scores, detectors))


def comparison_png(cells: CellRows, detectors: list[str]) -> str:
    """The detectors of one attack by strength."""
    return render((4.6, 4.4), lambda fig: draw_comparison(fig.subplots(), cells, detectors))


def thumbnails_png(thumbnails: Thumbnails) -> str:
    def draw(fig: Figure) -> None:
        draw_thumbnails(fig.subplots(3, len(thumbnails.labels), squeeze=False), thumbnails)
        fig.tight_layout()

    return render((1.25 * len(thumbnails.labels), 4.0), draw)


def adaptive_png(rows: Sequence[ResultRow], scores: Mapping[str, np.ndarray], columns: int = 4) -> str:
    """Per detector, the ROC curves of the oblivious and the adaptive attack overlaid."""
    lines = -(-len(rows) // columns)
    return render((3.0 * columns, 2.9 * lines), lambda fig: draw_adaptive(fig, rows, scores, lines, columns))


def draw_thumbnails(axes: np.ndarray, thumbnails: Thumbnails) -> None:
    """Three rows of axes (clean, adversarial, perturbation), one column per input."""
    amplified, gain = thumbnails.amplified
    for j in range(len(thumbnails.labels)):
        label, prediction = int(thumbnails.labels[j]), int(thumbnails.predictions[j])
        for row, (image, title, color) in enumerate((
                (thumbnails.clean[j], f"clean: {label}", "0.2"),
                (thumbnails.adversarial[j], f"adversarial: {prediction}", "#b00020" if prediction != label else "0.2"),
                (amplified[j], f"perturbation x{gain:.0f}", "0.4"))):
            ax = axes[row, j]
            picture = image.transpose(1, 2, 0)
            ax.imshow(picture[..., 0] if picture.shape[2] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=6.5, color=color)
            ax.set_xticks([])
            ax.set_yticks([])


def _style(detectors: list[str], name: str) -> dict[str, Any]:
    """One detector's line: its colour, and past the palette's ten colours another dash pattern,
    so that no two detectors of an audit (the default runs twelve) draw the same line."""
    index = detectors.index(name)
    return {"color": DETECTOR_COLORS[index % len(DETECTOR_COLORS)],
            "linestyle": ("-", "--", "-.", ":")[index // len(DETECTOR_COLORS) % 4]}


def draw_roc(ax: Axes, record: AttackRecord, rows: Sequence[ResultRow], scores: Mapping[str, np.ndarray],
             detectors: list[str], protocol: str = "seen") -> None:
    """ROC curves of every detector on one cell, under one protocol."""
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance (0.500)")
    reasons = []
    rows = [r for r in rows if r.protocol == protocol]
    for row in rows:
        clean = scores.get(f"{protocol}__{row.detector}__clean")
        adversarial = scores.get(f"{protocol}__{row.detector}__adversarial")
        if row.auroc is None or clean is None or adversarial is None:
            reasons.append(row.reason or "not scored")
            continue
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(clean)), np.ones(len(adversarial))], np.r_[clean, adversarial])
        ax.plot(fpr, tpr, **_style(detectors, row.detector), linewidth=1.8,
                label=f"{row.detector} ({row.auroc:.3f})")
    if reasons and len(reasons) == len(rows):
        ax.text(0.5, 0.55, "no ROC:\n" + "\n".join(textwrap.wrap(reasons[0], 38)), ha="center", va="center",
                fontsize=7, color="0.3", transform=ax.transAxes, bbox={"facecolor": "white", "edgecolor": "0.8"})
    asr = record.attack_success_rate
    success = "n/a" if asr is None else f"{100 * asr:.1f}%"
    ax.set_title(f"{record.attack}  {cell_label(record.to_dict(), ' = ')} ({protocol})\nsuccess {success}, "
                 f"test {rows[0].n_adv if rows else 0} adv. / {rows[0].n_clean if rows else 0} clean",
                 fontsize=8)
    ax.set_xlabel("false-positive rate (clean flagged)", fontsize=8)
    ax.set_ylabel("true-positive rate (adversarial flagged)", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    ax.legend(loc="lower right", fontsize=6, title="detector (AUROC)", title_fontsize=6)


def draw_comparison(ax: Axes, cells: CellRows, detectors: list[str]) -> None:
    """AUROC of every detector (``seen`` protocol) against strength, with the attack success rate."""
    records = [record for record, _ in cells]
    positions = np.arange(len(records))
    for name in detectors:
        values = [next((r.auroc for r in rows if r.detector == name and r.protocol == "seen"), None)
                  for _, rows in cells]
        ax.plot(positions, [np.nan if v is None else v for v in values], marker="o", **_style(detectors, name),
                label=name)
    ax.plot(positions, [np.nan if r.attack_success_rate is None else r.attack_success_rate for r in records],
            marker="s", linestyle=":", color="0.35", label="attack success rate")
    ax.axhline(0.5, linestyle="--", color="0.7", linewidth=1)
    ax.set_xticks(positions, [r.label if isinstance(r, OodRecord) else display_strength(r.strength) for r in records])
    ax.set_xlabel(records[0].strength_name, fontsize=8)
    ax.set_ylabel("AUROC / success rate", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{records[0].attack}: detectors by strength (seen)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")


def draw_adaptive(fig: Figure, rows: Sequence[ResultRow], scores: Mapping[str, np.ndarray], lines: int,
                  columns: int) -> None:
    """A grid of ``lines`` x ``columns`` axes: per detector, the ROC curves of the oblivious and the
    adaptive attack and the 5% false-positive line."""
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax, row in zip(axes.flat, rows):
        clean = scores[f"{row.detector}__clean"]
        for name, key, style in (("oblivious", "oblivious", "--"), ("adaptive", "adversarial", "-")):
            adversarial = scores[f"{row.detector}__{key}"]
            if len(clean) and len(adversarial):
                fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(clean)), np.ones(len(adversarial))],
                                        np.r_[clean, adversarial])
                ax.plot(fpr, tpr, style, label=name)
        ax.axvline(0.05, color="#999999", lw=0.6)
        ax.plot([0, 1], [0, 1], ":", color="#bbbbbb", lw=0.6)
        ax.set_title(row.detector, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.supxlabel("false-positive rate (clean inputs flagged)", fontsize=8)
    fig.supylabel("true-positive rate", fontsize=8)
    fig.tight_layout()
