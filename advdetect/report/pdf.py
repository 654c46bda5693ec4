"""``report.pdf``: the same view as ``report.html`` (verdict, key numbers, contents, tables with
their notes, figures with their captions), laid out as a document with ReportLab: tables that
wrap their text and run over as many pages as they need, internal links, page numbers."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import cm
from reportlab.lib.utils import ImageReader
from reportlab.platypus import Flowable, Image, PageBreak, Paragraph, SimpleDocTemplate, Spacer, Table, \
    TableStyle

from advdetect.run.storage import atomic_write

PAGE = landscape(A4)
MARGIN = 1.3 * cm
WIDTH = PAGE[0] - 2 * MARGIN
#: What a page's frame holds: SimpleDocTemplate's frame keeps 6 pt of padding on every side.
FRAME_WIDTH, FRAME_HEIGHT = WIDTH - 12, PAGE[1] - 2 * MARGIN - 12
#: A table cell's top (and bottom) padding and its left plus right padding: ReportLab's defaults.
CELL_PADDING, PANEL_PADDING = 3, 12
STYLES = getSampleStyleSheet()
BODY = ParagraphStyle("body", parent=STYLES["BodyText"], fontSize=8.5, leading=11)
NOTE = ParagraphStyle("note", parent=BODY, fontSize=7.5, leading=9.5, textColor=colors.HexColor("#444444"))
CELL = ParagraphStyle("cell", parent=BODY, fontSize=7, leading=8.5)
CELL_BOLD = ParagraphStyle("cell_bold", parent=CELL, fontName="Helvetica-Bold")
H1 = ParagraphStyle("h1", parent=STYLES["Heading1"], fontSize=17, spaceAfter=6)
H2 = ParagraphStyle("h2", parent=STYLES["Heading2"], fontSize=13, spaceBefore=10, spaceAfter=4)
H3 = ParagraphStyle("h3", parent=STYLES["Heading3"], fontSize=10.5, spaceBefore=6, spaceAfter=2)
GRID = [("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#cccccc")), ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#f3f3f3")), ("FONTSIZE", (0, 0), (-1, -1), 7),
        ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]


def _p(text: str, style: ParagraphStyle = BODY) -> Paragraph:
    """A paragraph of plain text: user strings are escaped, never read as markup."""
    return Paragraph(escape(str(text)), style)


def _heading(text: str, anchor: str, style: ParagraphStyle = H2) -> Paragraph:
    return Paragraph(f'<a name="{anchor}"/>{escape(text)}', style)


def _image(png_base64: str, width: float, height: float = FRAME_HEIGHT) -> Image:
    """A PNG scaled, aspect ratio kept, to the largest size that fits ``width`` x ``height`` and the
    page's frame: a figure taller than a page (a thumbnail strip of one input) would stop the
    layout."""
    data = base64.b64decode(png_base64)
    w, h = ImageReader(io.BytesIO(data)).getSize()
    scale = min(min(width, FRAME_WIDTH) / w, min(height, FRAME_HEIGHT) / h)
    return Image(io.BytesIO(data), width=w * scale, height=h * scale)


def _height(flowables: list[Flowable], width: float) -> float:
    """How much of a frame ``width`` wide the flowables take, their space before and after included."""
    return sum(f.wrap(width, FRAME_HEIGHT)[1] + f.getSpaceBefore() + f.getSpaceAfter() for f in flowables)


def _panel(png_base64: str, width: float, captions: list[Paragraph], column: float, room: float) -> list[Flowable]:
    """A figure over its captions, for one cell of a section's grid ``column`` wide: the figure is
    scaled to leave room for its captions within ``room`` (but kept at least a quarter of the page
    high)."""
    text = _height(captions, column - PANEL_PADDING)
    return [_image(png_base64, width, max(room - 2 * CELL_PADDING - text, FRAME_HEIGHT / 4)), *captions]


def _table(rows: list[list[Any]], widths: list[float] | None = None, header_rows: int = 1,
           extra: list[tuple] | None = None) -> Table:
    table = Table(rows, colWidths=widths, repeatRows=header_rows, hAlign="LEFT")
    table.setStyle(TableStyle(GRID + (extra or [])))
    return table


def _verdict(view: dict[str, Any]) -> list[Flowable]:
    verdict = view["verdict"]
    lines = [f'<font size="15"><b>{escape(verdict["status"])}</b></font>'
             + (f'<font size="11">: {escape(verdict["counts"])}</font>' if verdict["counts"] else "")]
    if verdict["text"]:
        lines.append(escape(verdict["text"]))
    lines += [f"FAILED {escape(line)}" for line in verdict["failed"]]
    white = ParagraphStyle("verdict", parent=BODY, textColor=colors.white, fontSize=9, leading=13)
    box = Table([[Paragraph("<br/>".join(lines), white)]], colWidths=[WIDTH])
    box.setStyle(TableStyle([("BACKGROUND", (0, 0), (-1, -1), colors.HexColor(verdict["color"])),
                             ("TOPPADDING", (0, 0), (-1, -1), 8), ("BOTTOMPADDING", (0, 0), (-1, -1), 8),
                             ("LEFTPADDING", (0, 0), (-1, -1), 10)]))
    return [Paragraph('<a name="verdict"/>', BODY), box]


def _pairs(items: list[tuple[str, str]], anchor: str, title: str) -> list[Flowable]:
    rows = [[_p(label, CELL_BOLD), _p(text, CELL)] for label, text in items]
    table = Table(rows, colWidths=[6 * cm, WIDTH - 6 * cm], hAlign="LEFT")
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("TOPPADDING", (0, 0), (-1, -1), 1),
                               ("BOTTOMPADDING", (0, 0), (-1, -1), 1)]))
    return [_heading(title, anchor), table]


def _contents(view: dict[str, Any]) -> list[Flowable]:
    entries = [("verdict", "Verdict"), ("key-numbers", "Key numbers"), ("run", "The run"), ("summary", "Summary"),
               ("comparison", "Detector comparison")]
    entries += [(f"protocol-{t['protocol']}", f"    protocol {t['protocol']}") for t in view["comparisons"]]
    if view.get("adaptive"):
        entries.append(("adaptive", "Against an attacker who knows the detector"))
    if view["trend"]:
        entries.append(("trend", "Trend"))
    entries += [(f"attack-{s['attack']}", f"Attack {s['attack']}") for s in view["sections"]]
    links = [f'<a href="#{anchor}" color="#0b5394">{escape(text).replace("  ", "&nbsp;&nbsp;")}</a>'
             for anchor, text in entries]
    return [_p("Contents", H3), Paragraph("<br/>".join(links), BODY)]


def _summary(view: dict[str, Any]) -> list[Flowable]:
    header, table = view["header"], view["table"]
    rows = [[_p(h, CELL_BOLD) for h in header]] + [[_p(v, CELL) for v in row] for row in table]
    return [_heading("Summary", "summary"),
            _p("AUROC under the seen protocol; * marks the best detector of each row.", NOTE),
            _table(rows, [WIDTH / len(header)] * len(header)), Spacer(1, 4), _p(view["reading_note"], NOTE)]


def _comparisons(view: dict[str, Any]) -> list[Flowable]:
    flow: list[Flowable] = [_heading("Detector comparison", "comparison"),
                            _p("AUROC of every detector on every attack and strength, one table per protocol; the "
                               "best of each column is bold on green; under each AUROC, +- half the width of its "
                               "bootstrap 95% interval.", NOTE)]
    for t in view["comparisons"]:
        n = len(t["columns"])
        first = 4.2 * cm
        widths = [first] + [(WIDTH - first) / n] * n
        rows = [[_p("detector", CELL_BOLD)] + [_p(f"{c['attack']}\n{c['strength']}".replace("\n", " "), CELL_BOLD)
                                               for c in t["columns"]]]
        style = []
        for i, row in enumerate(t["rows"], start=1):
            cells = [_p(row["detector"], CELL)]
            for j, (value, best, ci) in enumerate(row["cells"], start=1):
                text = escape(value) + (f'<br/><font size="5.5" color="#666666">{escape(ci)}</font>' if ci else "")
                cells.append(Paragraph(f"<b>{text}</b>" if best else text, CELL))
                if best:
                    style.append(("BACKGROUND", (j, i), (j, i), colors.HexColor("#d4edda")))
            rows.append(cells)
        flow += [_heading(f"protocol {t['protocol']}", f"protocol-{t['protocol']}", H3),
                 _p(t["description"] + ".", NOTE), _table(rows, widths, extra=style)]
    return flow


def _adaptive(adaptive: dict[str, Any]) -> list[Flowable]:
    header = adaptive["header"]
    rows = [[_p(h, CELL_BOLD) for h in header]]
    style = []
    for i, row in enumerate(adaptive["rows"], start=1):
        rows.append([_p(row["detector"] + (" (collapses)" if row["collapsed"] else ""), CELL),
                     *[_p(v, CELL) for v in row["cells"]]])
        if row["collapsed"]:
            style.append(("BACKGROUND", (0, i), (-1, i), colors.HexColor("#f8d7da")))
    first = 4.2 * cm
    widths = [first] + [(WIDTH - first) / (len(header) - 1)] * (len(header) - 1)
    return [_heading("Against an attacker who knows the detector", "adaptive"), _p(adaptive["note"], NOTE),
            _table(rows, widths, extra=style), Spacer(1, 4), _image(adaptive["png"], WIDTH, FRAME_HEIGHT * 0.55),
            _p("ROC curves per detector: the oblivious attack (dashed) and the attack that knows the detector "
               "(solid); the grey line marks 5% false positives.", NOTE)]


def _trend(trend: dict[str, Any]) -> list[Flowable]:
    note = (f"{len(trend['runs'])} earlier run(s) of this suite in the same output root ({', '.join(trend['runs'])}). "
            f"{trend['regressions']} regression(s) against the last one: an AUROC whose 95% bootstrap interval lies "
            f"below the earlier value, or an attack success rate whose 95% interval lies above it"
            + (f" (success rate: {', '.join(trend['asr_regressions'])})" if trend["asr_regressions"] else "") + ".")
    rows = [[_p(h, CELL_BOLD) for h in ("cell", "detector", "earlier AUROC (oldest first)", "AUROC now", "")]]
    style = []
    for i, r in enumerate(trend["rows"], start=1):
        history = " ".join("-" if v is None else f"{v:.3f}" for v in r["history"])
        rows.append([_p(r["cell"], CELL), _p(f"{r['detector']} ({r['protocol']})", CELL), _p(history, CELL),
                     _p("-" if r["current"] is None else f"{r['current']:.3f}", CELL),
                     _p("REGRESSION" if r["regression"] else "", CELL)])
        if r["regression"]:
            style.append(("BACKGROUND", (0, i), (-1, i), colors.HexColor("#f8d7da")))
    return [_heading("Trend", "trend"), _p(note, NOTE),
            _table(rows, [0.2 * WIDTH, 0.25 * WIDTH, 0.3 * WIDTH, 0.1 * WIDTH, 0.15 * WIDTH], extra=style)]


def _section(section: dict[str, Any]) -> list[Flowable]:
    flow: list[Flowable] = [PageBreak(), _heading(f"Attack {section['attack']}", f"attack-{section['attack']}")]
    if section["params"]:
        flow.append(_p(section["params"], NOTE))
    for line in section["unplotted"]:
        flow.append(_p(line, NOTE))
    column = (WIDTH - 0.6 * cm) / 3
    room = FRAME_HEIGHT - _height(flow[1:], FRAME_WIDTH)  # below the heading, so the first row fits its page
    panels = []
    if section["thumbnails"]:
        panels.append(_panel(section["thumbnails"], column - 0.6 * cm,
                             [_p(f"What {section['thumbnails_key']} did: clean input (label), adversarial input (the "
                                 f"model's class, red when fooled), perturbation amplified to the full range.", CELL)],
                             column, room))
    panels += [_panel(f["png"], column - 0.3 * cm, [_p(line, CELL) for line in f["captions"]], column, room)
               for f in section["figures"]]
    panels.append(_panel(section["comparison"], column - 0.3 * cm,
                         [_p("Every detector's AUROC against strength, with the attack's success rate.", CELL)],
                         column, room))
    grid = [panels[i : i + 3] + [[]] * (3 - len(panels[i : i + 3])) for i in range(0, len(panels), 3)]
    # a row taller than a page (captions of very many detectors) splits over pages rather than stop the layout
    too_tall = max(_height(panel, column - PANEL_PADDING) for panel in panels) + 2 * CELL_PADDING > FRAME_HEIGHT
    table = Table(grid, colWidths=[column] * 3, hAlign="LEFT", splitInRow=1 if too_tall else 0)
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP")]))
    flow.append(table)
    return flow


def _page_number(canvas: Any, doc: Any) -> None:
    canvas.saveState()
    canvas.setFont("Helvetica", 7)
    canvas.setFillColor(colors.HexColor("#777777"))
    canvas.drawRightString(PAGE[0] - MARGIN, 0.7 * cm, f"advdetect audit report, page {doc.page}")
    canvas.restoreState()


def write_pdf(path: Path, view: dict[str, Any]) -> None:
    """``report.pdf`` from the report's view (see :func:`advdetect.report.document.report_view`), written atomically."""
    flow: list[Flowable] = [_p("advdetect audit report", H1), *_verdict(view)]
    flow += _pairs(view["findings"], "key-numbers", "Key numbers")
    flow += [Spacer(1, 3), _p(view["robust_note"], NOTE), *_contents(view), PageBreak()]
    flow += _pairs(view["header_items"], "run", "The run")
    flow += _summary(view)
    flow += [PageBreak(), *_comparisons(view)]
    if view.get("adaptive"):
        flow += [PageBreak(), *_adaptive(view["adaptive"])]
    if view["trend"]:
        flow += [PageBreak(), *_trend(view["trend"])]
    for section in view["sections"]:
        flow += _section(section)

    def render(handle: Any) -> None:
        doc = SimpleDocTemplate(handle, pagesize=PAGE, leftMargin=MARGIN, rightMargin=MARGIN, topMargin=MARGIN,
                                bottomMargin=MARGIN, title="advdetect audit report", author="advdetect")
        doc.build(flow, onFirstPage=_page_number, onLaterPages=_page_number)

    atomic_write(path, render)
